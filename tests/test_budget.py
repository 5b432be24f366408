"""The budget: golden values from the seeds, and the meta count against PEFT's own count."""

from __future__ import annotations

import pytest
import torch

from kdray.config import LoraChoice, StudentConfig
from kdray.train.budget import count, head_cost, rank_limit
from kdray.train.models import build_student, count_trainable
from tests.conftest import TINY_CONFIGS


DISTILBERT_BASE = {"model_type": "distilbert"}  # DistilBertConfig() defaults = distilbert-base-uncased
ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1}


def student(config, mode="lora", **lora) -> StudentConfig:
    return StudentConfig(config=config, tokenizer="embedded:minilm-l6", mode=mode, lora=LoraChoice(**lora))


@pytest.mark.parametrize("spec, labels, expected", [
    (student(DISTILBERT_BASE, mode="head"), 2, 592_130),                      # seed 003 frozen baseline
    (student(DISTILBERT_BASE, r=8, target_modules=["q", "v"]), 2, 739_586),   # seed 003 LoRA r=8
    (student(DISTILBERT_BASE, r=16, target_modules=["q", "v"]), 2, 887_042),  # seed 003 LoRA r=16
    (student(ROBERTA_BASE, r=8, target_modules=["q", "v"]), 4, 888_580),      # seed 004 "LoRA only"
])
def test_golden_budget_values(spec, labels, expected):
    assert count(spec, labels) == expected


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("mode, lora", [
    ("lora", dict(r=4, target_modules=["q", "v"])),
    ("lora", dict(r=3, target_modules=["q", "k", "v", "o", "ffn_in", "ffn_out"], layers=[1])),
    ("lora", dict(r=2, target_modules=["ffn_out"], layers=[0])),
    ("lora", dict(r=4, target_modules=["q", "v", "ffn_in"], variant="dora")),
    ("lora", dict(r=2, target_modules=["q", "k", "v", "o"], layers=[0], variant="rslora")),
    ("head", {}),
    ("full", {}),
])
def test_meta_count_equals_peft_count_on_real_model(arch, mode, lora):
    spec = student(TINY_CONFIGS[arch], mode=mode, **lora)
    real = build_student(spec, num_labels=3, device="cpu")
    assert all(p.device.type == "cpu" for p in real.parameters())
    expected = real.get_nb_trainable_parameters()[0] if mode == "lora" else count_trainable(real)
    assert count(spec, 3) == expected


def test_lora_counts_each_targeted_linear_once():
    """ffn_out (BERT `output.dense`) must not also catch `attention.output.dense`."""
    spec = student(TINY_CONFIGS["bert"], r=1, target_modules=["ffn_out"])
    model = build_student(spec, 2, device="meta")
    adapted = sorted(n for n, _ in model.named_modules() if n.endswith("lora_A"))
    assert adapted == [f"base_model.model.bert.encoder.layer.{i}.output.dense.lora_A" for i in (0, 1)]
    # r=1 on one 64->32 linear per layer: 2 layers * (64 + 32) = 192, plus the head: the 32x32
    # pooler (1,056) and the 32*2+2 classifier.
    assert count(spec, 2) == 192 + 1056 + 66


def test_lora_variants_are_peft_s_own_and_the_budget_counts_them():
    """`lora_variant`: rsLoRA scales by lora_alpha / sqrt(r) at the same count; DoRA adds one trained
    magnitude per output feature of each adapted linear, and the meta count has it."""
    import math

    plain = student(TINY_CONFIGS["bert"], r=4, lora_alpha=8, target_modules=["q", "ffn_in"])
    rs = student(TINY_CONFIGS["bert"], r=4, lora_alpha=8, target_modules=["q", "ffn_in"], variant="rslora")
    dora = student(TINY_CONFIGS["bert"], r=4, lora_alpha=8, target_modules=["q", "ffn_in"], variant="dora")
    built = {v: build_student(s, 2, device="cpu") for v, s in (("lora", plain), ("rslora", rs), ("dora", dora))}
    query = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert built["lora"].get_submodule(query).scaling["default"] == 8 / 4
    assert built["rslora"].get_submodule(query).scaling["default"] == pytest.approx(8 / math.sqrt(4))
    magnitudes = {n: p.numel() for n, p in built["dora"].named_parameters() if "lora_magnitude_vector" in n}
    assert len(magnitudes) == 4 and sum(magnitudes.values()) == 2 * (32 + 64)  # q: 32 out, ffn_in: 64 out; 2 layers
    assert all(p.requires_grad for n, p in built["dora"].named_parameters() if "lora_magnitude_vector" in n)
    assert count(rs, 2) == count(plain, 2) == count_trainable(built["lora"]) == count_trainable(built["rslora"])
    assert count(dora, 2) == count(plain, 2) + 2 * (32 + 64) == count_trainable(built["dora"])


def test_distilbert_pre_classifier_trains_in_lora_mode():
    model = build_student(student(TINY_CONFIGS["distilbert"], r=2), 2, device="cpu")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("pre_classifier" in n for n in trainable)
    assert any("classifier" in n and "pre_" not in n for n in trainable)
    assert head_cost(student(TINY_CONFIGS["distilbert"]), 2) == (32 * 32 + 32) + (32 * 2 + 2)


def test_rank_limit_is_exact_at_the_boundary():
    spec = student(DISTILBERT_BASE, r=8, target_modules=["q", "v"])
    lim = rank_limit(spec, 2, ["q", "v"], None)
    assert lim.fixed == 592_130 and lim.per_rank == 18_432
    r = lim.max_rank(1_000_000)
    assert r == 22
    at = lambda rank: count(student(DISTILBERT_BASE, r=rank, target_modules=["q", "v"]), 2)  # noqa: E731
    assert at(r) <= 1_000_000 < at(r + 1)
    assert lim.max_rank(592_130 + 18_431) is None


def test_meta_build_allocates_nothing():
    model = build_student(student(ROBERTA_BASE, r=8), 4, device="meta")
    assert {p.device for p in model.parameters()} == {torch.device("meta")}
