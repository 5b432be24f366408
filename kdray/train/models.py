"""Model builders: teacher and student `AutoModelForSequenceClassification`, PEFT-wrapped student.

One code path builds every student: `build_student(..., device="meta")` is what the budget
counts (no memory, milliseconds) and `device="cpu"`/`"cuda"` is what trains, so the count can
not drift from the model.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdray.config import LoraChoice, ModelConfig, TrainableModelConfig
from kdray.errors import UserError
from kdray.sources import resolve_name


#: One set of module aliases for every architecture, relative to one encoder layer. Exact
#: names, not PEFT suffixes: in BERT the suffix `output.dense` matches both the FFN output and
#: `attention.output.dense`, so kdray resolves aliases to full module names itself.
_BERT_LIKE = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "o": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
}
MODULE_ALIASES: dict[str, dict[str, str]] = {
    "bert": _BERT_LIKE, "roberta": _BERT_LIKE, "xlm-roberta": _BERT_LIKE, "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": {
        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
        "o": "attention.out_lin", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2",
    },
}


def load_tokenizer(spec: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_name(spec.tokenizer or spec.name))


def model_config(spec: ModelConfig, num_labels: int, label_names: list[str] | None = None) -> Any:
    """The `transformers` config of the model as built: head size set, `keep_layers` applied."""
    from transformers import AutoConfig

    if spec.config is not None:
        cfg_dict = dict(spec.config)
        model_type = cfg_dict.pop("model_type")
        try:
            cfg = AutoConfig.for_model(model_type, **cfg_dict)
        except ValueError as e:
            raise UserError(f"config.model_type: {e}. Fix: use a transformers model type such as bert.") from None
    else:
        cfg = AutoConfig.from_pretrained(resolve_name(spec.name))
    cfg.num_labels = num_labels
    if label_names is not None:
        cfg.id2label = dict(enumerate(label_names))
        cfg.label2id = {n: i for i, n in enumerate(label_names)}
    if spec.keep_layers is not None:
        n = cfg.num_hidden_layers
        bad = [i for i in spec.keep_layers if not 0 <= i < n]
        if bad:
            raise UserError(f"keep_layers: layer(s) {bad} out of range for {spec.name or 'the inline config'}, "
                            f"which has {n} layers (0-{n - 1}). Fix: pick layers in 0-{n - 1}.")
        cfg.num_hidden_layers = len(spec.keep_layers)
    return cfg


def build_model(spec: ModelConfig, num_labels: int, label_names: list[str] | None = None,
                device: str | torch.device = "cpu", seed: int = 0, base: dict[str, Any] | None = None) -> nn.Module:
    """A sequence classifier from a spec: pretrained weights when `spec.name` and a real device.

    On `meta` only the shapes are built (for counting). `keep_layers` copies the chosen layers
    of the pretrained encoder (DistilBERT-style initialisation); the head is newly initialised.
    `base` (a `to_payload` of a classifier of the same model: the fine-tuned teacher, for
    `student.init: teacher`) replaces the pretrained weights, its head included.
    """
    from transformers import AutoModelForSequenceClassification

    cfg = model_config(spec, num_labels, label_names)
    torch.manual_seed(seed)
    if str(device) == "meta" or (spec.name is None and base is None):
        with torch.device(device):
            model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
        return model
    if base is not None:
        model = from_payload(base)  # in eval mode, as from_pretrained returns its model
        if model.config.num_labels != num_labels:
            raise UserError(f"student.init: teacher: the teacher has {model.config.num_labels} labels, the task "
                            f"{num_labels}. Fix: use student.init: pretrained.")
    else:
        full = copy.deepcopy(cfg)
        if spec.keep_layers is not None:
            full.num_hidden_layers = model_config(ModelConfig(name=spec.name), num_labels).num_hidden_layers
        model = AutoModelForSequenceClassification.from_pretrained(resolve_name(spec.name), config=full,
                                                                   dtype=torch.float32)
    if spec.keep_layers is not None:
        _keep_layers(model, spec.keep_layers)
        model.config.num_hidden_layers = len(spec.keep_layers)
    return model.to(device)


def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """`(qualified name, ModuleList)` of the encoder's transformer layers."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.endswith("layer"):
            return name, module
    raise UserError(f"cannot find the encoder layers of {type(model).__name__}. Fix: use a BERT-, "
                    f"RoBERTa- or DistilBERT-style encoder.")


def encoder_count(spec: ModelConfig, num_labels: int) -> int:
    """How many encoder layers `spec`'s model has (built on the meta device: no memory)."""
    return len(encoder_layers(build_model(spec, num_labels, device="meta"))[1])


def _keep_layers(model: nn.Module, keep: list[int]) -> None:
    name, layers = encoder_layers(model)
    parent = model.get_submodule(name.rsplit(".", 1)[0])
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(kept):
        for m in layer.modules():  # attention caches index layers by position
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_index
    setattr(parent, name.rsplit(".", 1)[1], kept)


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules outside the pretrained backbone that hold weights: the new head.

    Every family's head is then a dense + tanh/ReLU layer and the output linear: BERT
    `bert.pooler` and `classifier`; DistilBERT `pre_classifier` and `classifier` (PEFT's SEQ_CLS
    default saves only `classifier`/`score`, which would leave `pre_classifier` frozen at random
    init); RoBERTa `classifier` (dense + out_proj). BERT's pooler sits inside the backbone but is
    the classifier's input layer; frozen, a student of a model whose pooler was never trained for
    classification (sentence-transformers checkpoints such as all-MiniLM-L6-v2) reads features that
    barely vary, and a head-only baseline stays at chance.
    """
    backbone = model.base_model_prefix
    heads = [n for n, m in model.named_children() if n != backbone and any(True for _ in m.parameters())]
    pooler = getattr(getattr(model, backbone, None), "pooler", None)
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        heads.insert(0, f"{backbone}.pooler")
    return heads


def resolve_target_modules(model: nn.Module, lora: LoraChoice) -> list[str]:
    """Exact module names that get LoRA: each target (alias or layer-relative name) in each chosen layer."""
    prefix, layers = encoder_layers(model)
    aliases = MODULE_ALIASES.get(model.config.model_type, {})
    problems = []
    chosen = list(range(len(layers))) if lora.layers is None else lora.layers
    bad_layers = [i for i in chosen if not 0 <= i < len(layers)]
    if bad_layers:
        problems.append(f"student.lora.layers: {bad_layers} out of range: the student has {len(layers)} "
                        f"layers (0-{len(layers) - 1}). Fix: pick layers in that range.")
    inner = {n for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)}
    relative = []
    for t in lora.target_modules:
        rel = aliases.get(t, t)
        if rel not in inner:
            known = sorted(aliases) + sorted(inner)
            problems.append(f"student.lora.target_modules: {t!r} is not a linear module of a "
                            f"{model.config.model_type} layer. Fix: use one of {', '.join(known)}.")
        relative.append(rel)
    if len(set(relative)) != len(relative):
        problems.append(f"student.lora.target_modules: {lora.target_modules} names a module twice.")
    if problems:
        raise UserError(problems)
    return [f"{prefix}.{i}.{rel}" for i in sorted(set(chosen)) for rel in relative]


def apply_student_mode(model: nn.Module, student: TrainableModelConfig) -> nn.Module:
    """Make the student's trainable set: LoRA (PEFT) + head, head only, or everything."""
    head = head_modules(model)
    if student.mode == "full":
        model.requires_grad_(True)
        return model
    if student.mode == "head":
        model.requires_grad_(False)
        for name in head:
            model.get_submodule(name).requires_grad_(True)
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora = student.lora
    # DoRA: peft 0.21 calls transformers 5's deprecated `is_gradient_checkpointing`, a FutureWarning at
    # every build (each sample the budget counts), which is not the user's to act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.r, lora_alpha=lora.lora_alpha,
                        lora_dropout=lora.lora_dropout, target_modules=resolve_target_modules(model, lora),
                        modules_to_save=head, use_rslora=lora.variant == "rslora", use_dora=lora.variant == "dora")
    return get_peft_model(model, config)


def build_student(student: TrainableModelConfig, num_labels: int, label_names: list[str] | None = None,
                  device: str | torch.device = "cpu", seed: int = 0, base: dict[str, Any] | None = None) -> nn.Module:
    """The student exactly as it trains (on `meta`: exactly as the budget counts it). `base`: the
    weights it starts from when not the pretrained checkpoint's (`build_model`)."""
    return apply_student_mode(build_model(student, num_labels, label_names, device, seed, base), student)


def count_trainable(model: nn.Module) -> int:
    """Parameters with requires_grad=True: the budget's definition (head included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged(model: nn.Module) -> nn.Module:
    """A trained model as it is saved and served: LoRA merged into the weights (PEFT's
    `merge_and_unload`), a plain Hugging Face classifier; a model without adapters as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def to_payload(model: nn.Module) -> dict[str, Any]:
    """A plain (non-PEFT) classifier as `{config, state_dict}`: picklable for the object store,
    so workers never read a driver-local directory."""
    return {"config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def from_payload(payload: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg_dict = dict(payload["config"])
    cfg = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


def from_pretrained_dir(path: str | Path) -> nn.Module:
    """A saved plain classifier (e.g. the teacher stage's `model/`)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
