"""Model builders: layer-reduced copies, module aliases, and clear errors for bad model choices."""

from __future__ import annotations

import pytest
import torch

from kdray.config import LoraChoice, ModelConfig, StudentConfig
from kdray.errors import UserError
from kdray.train.models import build_model, build_student, encoder_layers, head_modules, resolve_target_modules
from tests.conftest import TINY_CONFIGS


def test_keep_layers_copies_the_chosen_pretrained_layers():
    teacher = build_model(ModelConfig(name="embedded:minilm-l6"), 2)
    student = build_model(ModelConfig(name="embedded:minilm-l6", keep_layers=[0, 2, 4]), 2)
    assert student.config.num_hidden_layers == 3
    t_layers, s_layers = encoder_layers(teacher)[1], encoder_layers(student)[1]
    for new, old in enumerate([0, 2, 4]):
        for (name, p), (_, q) in zip(s_layers[new].named_parameters(), t_layers[old].named_parameters()):
            assert torch.equal(p, q), name
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    # The shortened model still runs end to end.
    out = student(input_ids=torch.tensor([[101, 2023, 2003, 102]]))
    assert out.logits.shape == (1, 2)


def test_a_student_started_from_the_teacher_keeps_its_layers_and_head():
    """`student.init: teacher`: the kept layers, embeddings, pooler and classifier are the fine-tuned
    teacher's; the LoRA student built on them counts what the budget counts (the meta build)."""
    from kdray.train.budget import count
    from kdray.train.models import to_payload

    tiny = {**TINY_CONFIGS["bert"], "num_hidden_layers": 3}
    teacher = build_model(ModelConfig(config=tiny, tokenizer="embedded:minilm-l6"), 2, seed=7)
    with torch.no_grad():  # as if fine-tuned: nothing a fresh seed-0 build could reproduce
        for p in teacher.parameters():
            p.add_(0.01)
    spec = StudentConfig(config=tiny, tokenizer="embedded:minilm-l6", keep_layers=[0, 2], init="teacher",
                         lora=LoraChoice(r=2, target_modules=["q", "v"]))
    student = build_student(spec, 2, base=to_payload(teacher))
    plain = build_model(spec, 2)  # no base: the spec's own (here random, seed 0) weights
    s_layers, t_layers = encoder_layers(student)[1], encoder_layers(teacher)[1]
    assert len(s_layers) == 2
    for new, old in enumerate([0, 2]):
        q_s = s_layers[new].attention.self.query.base_layer.weight
        assert torch.equal(q_s, t_layers[old].attention.self.query.weight)
        assert torch.equal(s_layers[new].output.dense.weight, t_layers[old].output.dense.weight)
    base = student.base_model.model
    assert torch.equal(base.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert torch.equal(base.classifier.modules_to_save["default"].weight, teacher.classifier.weight)
    assert torch.equal(base.bert.pooler.modules_to_save["default"].dense.weight, teacher.bert.pooler.dense.weight)
    assert not torch.equal(plain.classifier.weight, teacher.classifier.weight)
    assert sum(p.numel() for p in student.parameters() if p.requires_grad) == count(spec, 2)
    # The teacher itself is untouched (each build copies the payload's weights).
    assert len(encoder_layers(teacher)[1]) == 3


def test_embedded_student_budget_matches_the_real_model():
    from kdray.train.budget import count

    spec = StudentConfig(name="embedded:minilm-l6", keep_layers=[0, 2, 4], lora=LoraChoice(r=8, target_modules=["q", "v"]))
    real = build_student(spec, 2)
    pooler, classifier = 384 * 384 + 384, 384 * 2 + 2  # the head: BERT's pooler and the output layer
    assert count(spec, 2) == real.get_nb_trainable_parameters()[0] == 3 * 2 * 8 * (384 + 384) + pooler + classifier


@pytest.mark.parametrize("arch, alias, expected", [
    ("bert", "o", "attention.output.dense"),
    ("roberta", "ffn_in", "intermediate.dense"),
    ("distilbert", "q", "attention.q_lin"),
    ("distilbert", "ffn_out", "ffn.lin2"),
    ("bert", "attention.self.key", "attention.self.key"),  # the architecture's own name works too
])
def test_aliases_resolve_per_architecture(arch, alias, expected):
    model = build_model(ModelConfig(config=TINY_CONFIGS[arch], tokenizer="x"), 2, device="meta")
    prefix = encoder_layers(model)[0]
    assert resolve_target_modules(model, LoraChoice(target_modules=[alias], layers=[1])) == [f"{prefix}.1.{expected}"]


def test_head_modules_are_the_new_layers():
    heads = {arch: head_modules(build_model(ModelConfig(config=c, tokenizer="x"), 2, device="meta"))
             for arch, c in TINY_CONFIGS.items()}
    assert heads == {"bert": ["bert.pooler", "classifier"], "distilbert": ["pre_classifier", "classifier"], "roberta": ["classifier"]}


def test_unknown_target_module_names_the_choices():
    spec = StudentConfig(config=TINY_CONFIGS["distilbert"], tokenizer="x", lora=LoraChoice(target_modules=["query", "v"]))
    with pytest.raises(UserError) as e:
        build_student(spec, 2, device="meta")
    msg = e.value.message()
    assert "'query' is not a linear module of a distilbert layer" in msg and "q_lin" in msg and "ffn_in" in msg


def test_lora_layers_out_of_range():
    spec = StudentConfig(config=TINY_CONFIGS["bert"], tokenizer="x", lora=LoraChoice(layers=[0, 5]))
    with pytest.raises(UserError, match=r"\[5\] out of range: the student has 2 layers"):
        build_student(spec, 2, device="meta")


def test_keep_layers_out_of_range():
    with pytest.raises(UserError, match=r"keep_layers: layer\(s\) \[6\] out of range .* has 6 layers \(0-5\)"):
        build_model(ModelConfig(name="embedded:minilm-l6", keep_layers=[0, 6]), 2, device="meta")


def test_unknown_embedded_model():
    with pytest.raises(UserError, match="not embedded"):
        build_model(ModelConfig(name="embedded:gpt-5"), 2, device="meta")
