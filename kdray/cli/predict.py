"""Classify text with a saved student (or any Hugging Face sequence classifier directory).

    kdray predict --model runs/NAME/final/student "a gripping, funny film" "dull"
    kdray predict --model runs/NAME/final/student-onnx-int8 "a gripping, funny film"   # onnxruntime, no torch
    echo "one text per line" | kdray predict --model runs/NAME/final/student
    kdray predict --model DIR --file texts.txt

Prints one line per text: label, probability, text (tab-separated).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdray.errors import UserError


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json", "spiece.model")


def check_model_dir(path: str) -> Path:
    """Refuse, with the fix, a directory that is not a saved sequence classifier with a tokenizer."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise UserError(f"--model {path}: no such directory. Fix: pass a saved student, e.g. runs/<name>/final/student.")
    config = d / "config.json"
    if not config.is_file():
        hint = " (it holds a PEFT adapter: use the merged final/student beside it)" if (
            d / "adapter_config.json").is_file() else ""
        raise UserError(f"--model {path}: no config.json, so not a Hugging Face model directory{hint}. Fix: pass "
                        f"runs/<name>/final/student.")
    try:
        cfg = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--model {path}: config.json is not valid JSON ({e}). Fix: re-save the model.") from None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(f"--model {path}: a {', '.join(archs) or 'model without a declared architecture'}, not a "
                        f"text classifier. Fix: pass a *ForSequenceClassification model such as runs/<name>/final/student.")
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"--model {path}: no tokenizer files beside the model. Fix: save the tokenizer into it "
                        f"(tokenizer.save_pretrained), as kdray's final stage does.")
    return d


def read_texts(args: argparse.Namespace) -> list[str]:
    if args.texts:
        texts = list(args.texts)
    elif args.file is not None:
        p = Path(args.file)
        if not p.is_file():
            raise UserError(f"--file {args.file}: no such file. Fix: give a text file, one example per line.")
        try:
            texts = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"--file {args.file}: not UTF-8 ({e}). Fix: convert it to UTF-8.") from None
    elif not sys.stdin.isatty():
        texts = sys.stdin.read().splitlines()
    else:
        raise UserError("no text to classify. Fix: give texts as arguments, --file FILE, or lines on stdin.")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("every given text is empty. Fix: give at least one non-empty text.")
    return texts


DESCRIPTION = ("Classify texts with a saved kdray student in any of its forms (final/student, final/student-onnx, "
               "final/student-onnx-int8) or any Hugging Face text classifier directory: prints label, probability "
               "and text per line. An ONNX form runs on onnxruntime without importing torch.")
EXAMPLES = (
    'kdray predict --model runs/default/final/student "a gorgeous, witty film" "flat and dull"',
    'kdray predict --model runs/default/final/student-onnx-int8 "a gorgeous, witty film"',
    'kdray predict --model runs/default/final/student --file texts.txt',
)


def arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help="model directory, e.g. runs/<name>/final/student or "
                    "runs/<name>/final/student-onnx-int8")
    ap.add_argument("texts", nargs="*", help="texts to classify (default: --file, else lines on stdin)")
    ap.add_argument("--file", help="text file, one example per line")
    ap.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")


def run(args: argparse.Namespace) -> int:
    model_dir = check_model_dir(args.model)
    texts = read_texts(args)
    from kdray.serve.forms import is_onnx_form

    if is_onnx_form(model_dir):
        return _run_onnx(model_dir, texts, args.batch_size)
    from transformers import pipeline

    max_length = None
    meta = model_dir / "kdray.json"
    if meta.is_file():
        max_length = json.loads(meta.read_text()).get("max_length")
    import torch

    classify = pipeline("text-classification", model=str(model_dir), device=0 if torch.cuda.is_available() else -1)
    kwargs = {"truncation": True, "batch_size": args.batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    for text, out in zip(texts, classify(texts, **kwargs)):
        print(f"{out['label']}\t{out['score']:.4f}\t{text}")
    return 0


def _run_onnx(model_dir: Path, texts: list[str], batch_size: int) -> int:
    """An ONNX form (`final/student-onnx*`) with onnxruntime and the tokenizer alone: torch is
    never imported, so the process starts faster and holds less (docs/serving.md)."""
    import os

    from kdray.serve.forms import META_FILE, OnnxClassifier

    if not (model_dir / META_FILE).is_file() or not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"--model {model_dir}: an ONNX model without kdray's {META_FILE} or tokenizer.json beside it. "
                        f"Fix: pass a form the final stage wrote (runs/<name>/final/student-onnx-int8), or make the "
                        f"forms again with `kdray export --run runs/<name>`.")
    classifier = OnnxClassifier.load(model_dir, threads=len(os.sched_getaffinity(0)))
    for text, (label, p) in zip(texts, classifier.predict(texts, batch_size)):
        print(f"{label}\t{p:.4f}\t{text}")
    return 0
