"""The student's serving forms, and an ONNX form loaded for inference without torch.

A form is a directory a user loads on its own: the model, its tokenizer (`tokenizer.json`), the
label names and the maximum length (`kdray.json`):

    final/student/            pytorch    Hugging Face safetensors, LoRA merged (`transformers`)
    final/student-onnx/       onnx       ONNX fp32 (`torch.onnx.export`)
    final/student-onnx-int8/  onnx-int8  ONNX with int8 weights, quantized dynamically

(`kdray.artifacts.RunDir.served` names them.)

`OnnxClassifier` needs `onnxruntime`, `tokenizers` and numpy only: `kdray predict` on an ONNX
form never imports torch (its start-up and memory: docs/serving.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


#: `serve.runtime`: where the student will run. Each names a form of the final stage.
RUNTIMES = ("pytorch", "onnx", "onnx-int8")
#: The file that holds an ONNX form's graph and weights.
ONNX_FILE = "model.onnx"
#: What a form's directory says of itself beside the model and the tokenizer.
META_FILE = "kdray.json"


def is_onnx_form(path: Path) -> bool:
    return (Path(path) / ONNX_FILE).is_file()


def runtime_options(threads: int) -> Any:
    """ONNX Runtime on `threads` intra-op threads (the count the PyTorch side runs on), one inter-op
    thread and every graph optimization (its transformer fusions included). Its threads spin
    between calls, ONNX Runtime's default: at batch 1 the default's int8 student took 1.87 ms p50
    with 2 spinning threads, 3.02 ms when they slept (2026-12-02, onnxruntime 1.32.0, the student of
    the default's run at commit d451901, the 2-core AMD EPYC VM)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def providers(use_cuda: bool) -> list[str]:
    """CUDA where asked and onnxruntime has its CUDA provider, else the CPU."""
    import onnxruntime as ort

    if use_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_tokenizer(tokenizer_json: str, max_length: int) -> Any:
    """The form's fast tokenizer (the `tokenizers` library, as `transformers` runs it), truncating
    to `max_length` and padding a batch to its longest text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length)
    pad_id = tok.padding["pad_id"] if tok.padding else (tok.token_to_id("[PAD]") or tok.token_to_id("<pad>") or 0)
    tok.enable_padding(pad_id=pad_id)
    return tok


def encode(tokenizer: Any, texts: list[str] | list[tuple[str, str]], names: list[str]) -> dict[str, np.ndarray]:
    """A batch as the model's int64 inputs (`names`: input_ids, attention_mask, token_type_ids as the
    graph takes them)."""
    encodings = tokenizer.encode_batch(texts)
    arrays = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
              "token_type_ids": [e.type_ids for e in encodings]}
    return {n: np.asarray(arrays[n], dtype=np.int64) for n in names}


class OnnxClassifier:
    """An ONNX form as a classifier: texts in, logits or (label, probability) out."""

    def __init__(self, onnx: bytes | str | Path, tokenizer_json: str, max_length: int, label_names: list[str], *,
                 threads: int = 1, use_cuda: bool = False):
        import onnxruntime as ort

        model = onnx if isinstance(onnx, bytes) else str(onnx)
        self.inference = ort.InferenceSession(model, runtime_options(threads), providers=providers(use_cuda))
        self.names = [i.name for i in self.inference.get_inputs()]
        self.tokenizer = load_tokenizer(tokenizer_json, max_length)
        self.label_names = label_names
        self.provider = self.inference.get_providers()[0]

    @classmethod
    def load(cls, path: str | Path, threads: int = 1) -> "OnnxClassifier":
        """A form directory as the final stage wrote it."""
        d = Path(path)
        meta = json.loads((d / META_FILE).read_text())
        return cls(d / ONNX_FILE, (d / "tokenizer.json").read_text(encoding="utf-8"), int(meta["max_length"]),
                   list(meta["label_names"]), threads=threads)

    def logits(self, texts: list[str] | list[tuple[str, str]]) -> np.ndarray:
        return self.inference.run(None, encode(self.tokenizer, texts, self.names))[0]

    def predict(self, texts: list[str], batch_size: int = 32) -> list[tuple[str, float]]:
        """(label, probability) per text."""
        out = []
        for i in range(0, len(texts), batch_size):
            z = self.logits(texts[i:i + batch_size]).astype(np.float64)
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out += [(self.label_names[k], float(p[j, k])) for j, k in enumerate(p.argmax(-1))]
        return out
