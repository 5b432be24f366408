"""Benchmarks that print numbers (never timed tests). Results go to bench/results/*.json.

    python -m kdray.bench step [--teacher embedded:minilm-l6] [--steps 20] [--batch-size 32]

`step`: samples/s of one KD training step with cached teacher logits vs the online teacher
(teacher forward per batch, the seeds' way), on the same batches, in one process, and the
padding efficiency (real / padded tokens) with and without length grouping.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path("bench") / "results"


def _environment(device: torch.device) -> dict:
    import peft
    import ray
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "device_name": name, "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "ray": ray.__version__, "python": platform.python_version(),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    return float(sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches))


def bench_step(args: argparse.Namespace) -> dict:
    from kdray.config import ModelConfig, load_config
    from kdray.data import load_data, tokenize
    from kdray.distill import (CachedTeacher, OnlineTeacher, Split, TeacherLogits, autocast_for, backward_step,
                               forward_loss, make_batches, make_optimizer, predict_logits)
    from kdray.models import build_model, build_student, count_trainable, load_tokenizer

    device = torch.device(args.device)
    cfg = load_config(args.space, args.overrides)
    task = load_data(cfg.data)
    teacher_spec = ModelConfig(name=args.teacher) if args.teacher else cfg.teacher
    tok = load_tokenizer(cfg.student)
    tokenized, _ = tokenize(task, tok, cfg.data.max_length, cfg.cache_dir)
    train = Split.from_dataset(tokenized["train"])
    teacher = build_model(teacher_spec, task.num_labels, device=device).eval()
    n_batches = args.warmup + args.steps
    batches = make_batches(train.lengths, args.batch_size, shuffle=True, seed=0, epoch=0, group_by_length=True)[:n_batches]
    used = np.concatenate(batches)
    # The cached table holds exactly what the teacher stage would have written for these rows.
    table = TeacherLogits(train.example_ids[used], predict_logits(teacher, train, 128, tok.pad_token_id, device, used))
    train_cfg = dataclasses.replace(cfg.train, alpha=0.5, batch_size=args.batch_size)
    autocast = autocast_for(device)
    results = {}
    for mode, source in (("cached", CachedTeacher(table)), ("online", OnlineTeacher(teacher))):
        student = build_student(cfg.student, task.num_labels, device="cpu", seed=0).to(device)
        optimizer = make_optimizer(student, train_cfg, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        student.train()
        seen = 0
        for i, idx in enumerate(batches):
            if i == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, seen = time.perf_counter(), 0
            batch = train.collate(idx, tok.pad_token_id, device)
            loss, _, _ = forward_loss(student, batch, source, train_cfg, autocast)
            backward_step(student, loss, optimizer, scheduler, train_cfg)
            seen += len(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        results[mode] = {"samples_per_s": seen / seconds, "seconds": seconds, "samples": seen}
    lengths = train.lengths
    grouped = make_batches(lengths, args.batch_size, shuffle=True, seed=0, epoch=0, group_by_length=True)
    plain = make_batches(lengths, args.batch_size, shuffle=True, seed=0, epoch=0, group_by_length=False)
    return {
        "benchmark": "step",
        "settings": {"space": Path(cfg.source_file).stem, "teacher": teacher_spec.name or "inline config",
                     "student": cfg.student.name or "inline config", "student_keep_layers": cfg.student.keep_layers,
                     "student_mode": cfg.student.mode, "lora_r": cfg.student.lora.r,
                     "student_trainable_params": count_trainable(student), "batch_size": args.batch_size,
                     "max_length": cfg.data.max_length, "steps": args.steps, "warmup": args.warmup},
        "environment": _environment(device),
        "cached_samples_per_s": results["cached"]["samples_per_s"],
        "online_samples_per_s": results["online"]["samples_per_s"],
        "speedup_cached_vs_online": results["cached"]["samples_per_s"] / results["online"]["samples_per_s"],
        "padding_efficiency_grouped": _padding_efficiency(lengths, grouped),
        "padding_efficiency_ungrouped": _padding_efficiency(lengths, plain),
    }


def print_step(r: dict) -> None:
    s, e = r["settings"], r["environment"]
    print(f"step benchmark on {e['device']} ({e['device_name']}, {e['cpu_threads']} threads): teacher {s['teacher']}, "
          f"student {s['student']} keep_layers {s['student_keep_layers']} {s['student_mode']} r={s['lora_r']} "
          f"({s['student_trainable_params']:,} trainable), batch {s['batch_size']}, max_length {s['max_length']}, "
          f"{s['steps']} timed steps")
    print(f"  {'KD step':<36} {'samples/s':>10}")
    print(f"  {'cached teacher logits':<36} {r['cached_samples_per_s']:>10.1f}")
    print(f"  {'online teacher (forward per batch)':<36} {r['online_samples_per_s']:>10.1f}")
    print(f"  {'ratio cached / online':<36} {r['speedup_cached_vs_online']:>9.2f}x")
    print(f"  padding efficiency (real / padded tokens): grouped {r['padding_efficiency_grouped']:.3f}, "
          f"ungrouped {r['padding_efficiency_ungrouped']:.3f} "
          f"({r['padding_efficiency_grouped'] / r['padding_efficiency_ungrouped']:.2f}x)")


def main(argv: list[str] | None = None) -> int:
    from kdray.config import add_space_arguments

    ap = argparse.ArgumentParser(prog="python -m kdray.bench", description="kdray benchmarks: print numbers, write JSON.")
    sub = ap.add_subparsers(dest="which", required=True)
    st = sub.add_parser("step", help="cached-logits vs online-teacher KD step (samples/s), padding efficiency")
    add_space_arguments(st, "data.max_length=128")
    st.add_argument("--teacher", default=None, help="teacher model (default: the space's teacher)")
    st.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    st.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    st.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    st.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    st.add_argument("--output", default=None, help="JSON path (default bench/results/step-<device>.json)")
    args = ap.parse_args(argv)
    result = bench_step(args)
    print_step(result)
    out = Path(args.output or RESULTS_DIR / f"step-{torch.device(args.device).type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from kdray.errors import run_cli

    run_cli(main)
