"""Export a trained classifier to its ONNX forms with the well-kept tools: `torch.onnx.export`
(the dynamo exporter), ONNX Runtime's transformer optimizer (its fusions, where they apply) and
`onnxruntime.quantization.quantize_dynamic` (int8 weights, activations quantized per call).

Everything happens in memory (the forms as bytes), so the same code writes a run's form
directories on the driver and builds the forms of the student shapes inside a Ray task.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdray.serve.forms import META_FILE, ONNX_FILE


#: The largest difference of an ONNX form's validation logits from PyTorch's fp32 logits that
#: passes its check. fp32: the same arithmetic in another order (~1e-5 seen); int8: quantization
#: error (0.02-0.2 seen on the shipped spaces' students); beyond these the form is broken, not
#: rounded. The int8 form's accuracy is judged on test (`serve.max_accuracy_drop`).
TOLERANCE = {"onnx": 1e-3, "onnx-int8": 1.0}


class ExportError(Exception):
    """A form could not be made: the exporter, the optimizer or the quantizer failed."""


class _Logits(nn.Module):
    """The classifier as a graph from positional int64 inputs to logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types).logits


def input_names(model: nn.Module) -> list[str]:
    """The inputs the graph takes: token types only where the architecture has them (BERT)."""
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if getattr(model.config, "type_vocab_size", 0) > 1
                                              or model.config.model_type == "bert" else [])


def to_onnx(model: nn.Module) -> bytes:
    """The fp32 ONNX form of a plain (merged) Hugging Face classifier, dynamic in batch and length.
    ONNX Runtime applies its transformer fusions (SkipLayerNormalization, BiasGelu, ...) when it
    loads the graph (every graph optimization on: `kdray.serve.forms.runtime_options`); its
    offline optimizer (`onnxruntime.transformers.optimizer`) found the same fusions and ran no
    faster, and its fused operators would keep the quantizer from reading the graph."""
    model = model.float().eval().cpu()
    names = input_names(model)
    example = [torch.tensor([[101, 2023, 2003, 1037, 102], [101, 2307, 102, 0, 0]])]
    example.append((example[0] != 0).long())
    if "token_type_ids" in names:
        example.append(torch.zeros_like(example[0]))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with tempfile.TemporaryDirectory(prefix="kdray-onnx-") as tmp, _quiet():
        path = Path(tmp) / ONNX_FILE
        try:
            torch.onnx.export(_Logits(model), tuple(example), str(path), input_names=names,
                              output_names=["logits"], dynamic_shapes=tuple({0: batch, 1: length} for _ in names),
                              dynamo=True, external_data=False)
        except Exception as e:  # the exporter's own error: which operator or construct it could not handle
            raise ExportError(f"torch.onnx.export cannot export this {model.config.model_type} model "
                              f"({_summary(e)})") from None
        return path.read_bytes()


def _summary(e: Exception) -> str:
    """The exporter's own one-line reason: the line under its "## Exception summary" heading (the
    first line is only which of its steps failed), without terminal colours."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    if "## Exception summary" in lines:
        after = [line for line in lines[lines.index("## Exception summary") + 1:] if line]
        if after:
            return after[0][:300]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def to_int8(onnx_fp32: bytes) -> bytes:
    """Dynamic int8 quantization of an fp32 form: weights (MatMul, Gather: the embedding table too)
    stored as int8 with a scale per output channel; activations quantized per call. Per channel:
    on the default's student (validation, 853 sentences) 98.4% of the classes agreed with fp32
    against 95.9% per tensor, and accuracy moved -0.2 pt against -1.3 pt, at the same size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="kdray-int8-") as tmp, _quiet():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(onnx_fp32)
        try:
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        except Exception as e:
            raise ExportError(f"onnxruntime's quantize_dynamic failed ({type(e).__name__}: {str(e)[:300]})") from None
        return dst.read_bytes()


def make_forms(model: nn.Module, runtimes: tuple[str, ...] = ("onnx", "onnx-int8")) -> dict[str, bytes]:
    """`{"onnx": fp32 bytes, "onnx-int8": int8 bytes}` of a plain classifier (those of `runtimes`)."""
    exported = to_onnx(model)
    return {rt: exported if rt == "onnx" else to_int8(exported) for rt in runtimes}


def batch_logits(run: Any, split: Any, names: list[str], batch_size: int = 32) -> np.ndarray:
    """Logits of every row of a tokenized `split` (`kdray.train.batches.Split`), padded per batch,
    from `run(inputs: dict[name, int64 array]) -> logits`."""
    out = []
    for i in range(0, len(split), batch_size):
        rows = split.input_ids[i:i + batch_size]
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, :len(r)], mask[j, :len(r)] = r, 1
            if split.token_type_ids is not None:
                types[j, :len(r)] = split.token_type_ids[i + j]
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        out.append(run({n: arrays[n] for n in names}))
    return np.concatenate(out)


def check_form(onnx: bytes, model: nn.Module, split: Any, runtime: str) -> dict[str, Any]:
    """Compare a form's logits with PyTorch's fp32 logits of `model` on `split` (validation):
    the largest absolute difference, the share of rows whose class agrees, and whether it passes
    (`TOLERANCE`). Both sides read the same token ids, pads included."""
    import onnxruntime as ort

    from kdray.serve.forms import runtime_options

    names = input_names(model)
    inference = ort.InferenceSession(onnx, runtime_options(torch.get_num_threads()), providers=["CPUExecutionProvider"])
    model = model.float().eval().cpu()
    with torch.inference_mode():
        reference = batch_logits(lambda x: model(**{k: torch.from_numpy(v) for k, v in x.items()}).logits.numpy(),
                                 split, names)
    got = batch_logits(lambda x: inference.run(None, x)[0], split, names)
    diff = float(np.abs(got - reference).max())
    return {"max_abs_logit_diff": diff, "tolerance": TOLERANCE[runtime], "passed": diff <= TOLERANCE[runtime],
            "same_class": float((got.argmax(-1) == reference.argmax(-1)).mean()), "rows": len(split)}


def write_form(dest: Path, onnx: bytes, source_dir: Path, check: dict[str, Any] | None, runtime: str) -> Path:
    """A form directory: `model.onnx`, the tokenizer and config of `source_dir` (the PyTorch form),
    and its `kdray.json` with the form's runtime and logits check added."""
    import shutil

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / ONNX_FILE).write_bytes(onnx)
    for f in source_dir.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model") and f.name != META_FILE:
            shutil.copy2(f, tmp / f.name)
    meta = json.loads((source_dir / META_FILE).read_text()) if (source_dir / META_FILE).is_file() else {}
    (tmp / META_FILE).write_text(json.dumps({**meta, "runtime": runtime, "check": check}, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


@contextlib.contextmanager
def _quiet():
    """The exporter's and the quantizer's progress lines and advice stay off kdray's console."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "root", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
