"""Benchmarks that print numbers (never timed tests). Results go to bench/results/*.json.

    python bench/bench.py step     [--sizes embedded|base] [--steps 20] [--batch-size 32]
    python bench/bench.py infer    [--sizes embedded|base] [--runs 100]
    python bench/bench.py overhead --run runs/NAME
    python bench/bench.py search   [--quick]

`step`: samples/s of one KD training step with cached teacher logits vs the online teacher
(teacher forward per batch, the usual way), on the same batches, in one process, and the
padding efficiency (real / padded tokens) with and without length grouping.
`infer`: teacher vs merged vs unmerged student vs a plain model of the student's shape (and
int8 dynamic quantisation on CPU): latency p50/p95 at batch 1, throughput at batch 32.
`overhead`: per-trial fixed cost (trial wall time minus time in the training loop) and the
share of the search's wall time the trial slots were busy, from a finished run.
`search`: kdray vs the usual way of searching (Hugging Face `Trainer.hyperparameter_search`
with Optuna and a KD `Trainer` that runs the teacher per batch), same data, space, trials and
epochs, one after the other on this machine.

`--sizes embedded` uses the embedded models and Rotten Tomatoes (CPU); `--sizes base` builds a
BERT-base-shaped teacher (12 x 768) and a DistilBERT-shaped student (6 x 768) from configs, with
random token sequences of Rotten Tomatoes' length distribution: no hub, no data package (GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # kdray from this checkout, however the script is started
RESULTS_DIR = ROOT / "bench" / "results"


def _environment(device: torch.device) -> dict:
    from kdray.machine import device_name, package_version

    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"device": str(device), "device_name": device_name(device), "cpu_threads": torch.get_num_threads(),
            **{pkg: package_version(pkg) for pkg in ("torch", "transformers", "peft", "ray", "optuna")},
            "python": platform.python_version(), "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit.strip() or None}


# ----------------------------------------------------------------------------- models and data

#: `--sizes base`: BERT-base and a DistilBERT-sized (6-layer) BERT, built from configs.
BASE = {"model_type": "bert", "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
        "vocab_size": 30522}


def bench_setup(args: argparse.Namespace) -> dict:
    """Teacher and student specs, a train and a test `Split`, the pad id: for `--sizes`."""
    from kdray.config import LoraChoice, ModelConfig, StudentConfig, load_config
    from kdray.train.batches import Split

    if args.sizes == "base":
        rng = np.random.default_rng(0)
        # Rotten Tomatoes' token lengths (MiniLM tokenizer): median ~26, long tail, capped.
        def split(n: int) -> Split:
            lengths = np.clip(rng.lognormal(3.2, 0.45, n).astype(int), 6, args.max_length)
            ids = [np.concatenate([[101], rng.integers(1000, 30000, k - 2), [102]]).astype(np.int32) for k in lengths]
            return Split(ids, rng.integers(0, 2, n).astype(np.int64), np.arange(n, dtype=np.int64))

        lora = LoraChoice(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q", "v"])
        return {"teacher": ModelConfig(config={**BASE, "num_hidden_layers": 12}),
                "student": StudentConfig(config={**BASE, "num_hidden_layers": 6}, mode="lora", lora=lora),
                "train": split(4096), "test": split(1024), "pad_id": 0, "num_labels": 2,
                "describe": "BERT-base config teacher (12 x 768) -> 6 x 768 BERT LoRA r=8 q,v student, random "
                            f"weights, synthetic RT-length sequences (max_length {args.max_length})"}
    from kdray.data.load import load_data
    from kdray.data.tokenize import tokenize
    from kdray.train.models import load_tokenizer

    cfg = load_config(args.space, args.overrides)
    task = load_data(cfg.data)
    tok = load_tokenizer(cfg.student)
    tokenized, _ = tokenize(task, tok, cfg.data.max_length, cfg.cache_dir)
    test, _ = tokenize(task, tok, cfg.data.max_length, cfg.cache_dir, test=task.read_test("bench"))
    return {"teacher": cfg.teacher, "student": cfg.student, "train": Split.from_dataset(tokenized["train"]),
            "test": Split.from_dataset(test["test"]), "pad_id": tok.pad_token_id, "num_labels": task.num_labels,
            "cfg": cfg, "describe": f"{Path(cfg.source_file).stem} space: teacher {cfg.teacher.name}, student "
                                    f"{cfg.student.name} keep_layers {cfg.student.keep_layers} LoRA r={cfg.student.lora.r} "
                                    f"{','.join(cfg.student.lora.target_modules)}, {task.description}"}


def _padding_efficiency(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    return float(sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches))


def bench_step(args: argparse.Namespace) -> dict:
    """One KD training step, cached teacher logits vs the teacher run on every batch, on the same
    batches. Each mode first trains once over every timed batch (on a GPU that loads its kernels
    and picks them for each batch shape), then the modes alternate (ABAB...) over `--rounds`
    timed passes, so warm-up and slow drifts of the machine fall on neither side."""
    from kdray.config import TrainConfig
    from kdray.train.batches import DeviceSplit, make_batches
    from kdray.train.logits import TeacherLogits
    from kdray.train.loop import (OnlineTeacher, backward_step, cached_teacher, forward_loss, make_optimizer,
                                  predict_logits)
    from kdray.train.models import build_model, build_student, count_trainable
    from kdray.train.precision import autocast_for, resolve_precision

    device = torch.device(args.device)
    setup = bench_setup(args)
    train, pad = setup["train"], setup["pad_id"]
    teacher = build_model(setup["teacher"], setup["num_labels"], device=device).eval()
    batches = make_batches(train.lengths, args.batch_size, shuffle=True, seed=0, epoch=0, group_by_length=True)[:args.steps]
    # The cached table holds exactly what the teacher stage would have written for these rows.
    train_cfg = TrainConfig(alpha=0.5, batch_size=args.batch_size, precision=args.precision)
    table = TeacherLogits(train.example_ids, predict_logits(teacher, train, 128, pad, device, precision=args.precision))
    resident = DeviceSplit(train, pad, device, table)
    autocast = autocast_for(device, args.precision)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    modes = {"cached": cached_teacher, "online": OnlineTeacher(teacher)}
    states = {}
    for mode in modes:
        student = build_student(setup["student"], setup["num_labels"], device="cpu", seed=0).to(device).train()
        optimizer = make_optimizer(student, train_cfg, device)
        states[mode] = (student, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))

    def one_pass(mode: str) -> float:
        student, optimizer, scheduler = states[mode]
        sync()
        t0 = time.perf_counter()
        for idx in batches:
            loss, _, _ = forward_loss(student, resident.batch(idx), modes[mode], train_cfg, autocast)
            backward_step(student, loss, optimizer, scheduler, train_cfg)
        sync()
        return time.perf_counter() - t0

    warm = {mode: one_pass(mode) for mode in modes}
    timed: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            timed[mode].append(one_pass(mode))
    samples = sum(len(b) for b in batches)
    results = {mode: {"samples_per_s": samples / float(np.median(t)), "pass_seconds": t, "warmup_pass_seconds": warm[mode]}
               for mode, t in timed.items()}
    lengths = train.lengths
    grouped = make_batches(lengths, args.batch_size, shuffle=True, seed=0, epoch=0, group_by_length=True)
    plain = make_batches(lengths, args.batch_size, shuffle=True, seed=0, epoch=0, group_by_length=False)
    return {
        "benchmark": "step",
        "settings": {"sizes": args.sizes, "models": setup["describe"],
                     "student_trainable_params": count_trainable(states["cached"][0]), "batch_size": args.batch_size,
                     "steps": len(batches), "rounds": args.rounds, "order": "warm pass per mode, then ABAB",
                     "precision": args.precision, "precision_used": resolve_precision(device, args.precision)},
        "environment": _environment(device),
        "passes": results,
        "gpu_target": _gpu_target(device, "cached step >= 1.4x the online step, both warm",
                                  results["cached"]["samples_per_s"] / results["online"]["samples_per_s"] >= 1.4),
        "cached_samples_per_s": results["cached"]["samples_per_s"],
        "online_samples_per_s": results["online"]["samples_per_s"],
        "speedup_cached_vs_online": results["cached"]["samples_per_s"] / results["online"]["samples_per_s"],
        "padding_efficiency_grouped": _padding_efficiency(lengths, grouped),
        "padding_efficiency_ungrouped": _padding_efficiency(lengths, plain),
    }


def bench_eval(args: argparse.Namespace) -> dict:
    """One evaluation pass (`predict_logits` over the space's validation split, as every epoch
    and the teacher's logits run it) per batch size: the student as a trial builds it, on the
    threads a trial gets, and the teacher on the teacher stage's. Each size is warmed once, then
    the sizes alternate (ABAB) over `--rounds` passes; the median pass counts."""
    from kdray.config import load_config
    from kdray.data.load import load_data
    from kdray.data.tokenize import tokenize
    from kdray.train.batches import DeviceSplit, Split
    from kdray.train.loop import predict_logits
    from kdray.train.models import build_model, build_student, load_tokenizer
    from kdray.train.precision import resolve_precision

    cfg = load_config(args.space, args.overrides)
    task = load_data(cfg.data)
    device = torch.device(args.device)
    threads_before, roles = torch.get_num_threads(), {}
    teacher_res = cfg.teacher.resources or cfg.resources
    for role, spec, cpus, precision in (
            ("student", cfg.student, cfg.resources.cpus_per_worker, cfg.train.precision),
            ("teacher", cfg.teacher, teacher_res.cpus_per_worker, cfg.teacher.train.precision)):
        tok = load_tokenizer(spec)
        split = Split.from_dataset(tokenize(task, tok, cfg.data.max_length, cfg.cache_dir)[0]["validation"])
        resident = DeviceSplit(split, tok.pad_token_id, device)
        build = build_student if role == "student" else build_model
        model = build(spec, task.num_labels, device="cpu").to(device).eval()
        if device.type == "cpu":
            torch.set_num_threads(max(1, int(round(cpus))))
        passes: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
        for _ in range(args.rounds + 1):  # the first round warms every size
            for b in passes:
                t0 = time.perf_counter()
                predict_logits(model, resident, b, tok.pad_token_id, device, precision=precision)
                passes[b].append(time.perf_counter() - t0)
        roles[role] = {"threads": torch.get_num_threads(), "examples": len(split),
                       "precision_used": resolve_precision(device, precision),
                       "seconds_median": {str(b): float(np.median(t[1:])) for b, t in passes.items()},
                       "pass_seconds": {str(b): t[1:] for b, t in passes.items()}}
    torch.set_num_threads(threads_before)
    return {"benchmark": "eval", "environment": _environment(device),
            "settings": {"space": args.space, "batch_sizes": args.batch_sizes, "rounds": args.rounds,
                         "order": "one warm pass per size, then ABAB"}, **roles}


def print_eval(r: dict) -> None:
    for role in ("student", "teacher"):
        t = r[role]["seconds_median"]
        print(f"{role:<8} {r[role]['examples']} validation examples on {r[role]['threads']} thread(s): "
              + ", ".join(f"batch {b} {sec:.2f} s" for b, sec in t.items()))


def _gpu_target(device: torch.device, target: str, holds: bool) -> dict:
    """A target set for a GPU: judged on one, and said to need one on a CPU run."""
    if device.type == "cuda":
        return {"target": target, "holds": bool(holds)}
    return {"target": target, "holds": None, "why": f"needs a GPU: this ran on {device.type}"}


def _print_gpu_target(r: dict) -> None:
    g = r.get("gpu_target")
    if g is not None:
        verdict = "needs a GPU (this run was on the CPU)" if g["holds"] is None else ("holds" if g["holds"] else "does NOT hold")
        print(f"  GPU target: {g['target']}: {verdict}")


def print_step(r: dict) -> None:
    s, e = r["settings"], r["environment"]
    print(f"step benchmark on {e['device_name']}: {s['models']}; {s['student_trainable_params']:,} trainable, "
          f"batch {s['batch_size']}, {s['steps']} timed steps")
    print(f"  {'KD step':<36} {'samples/s':>10}")
    print(f"  {'cached teacher logits':<36} {r['cached_samples_per_s']:>10.1f}")
    print(f"  {'online teacher (forward per batch)':<36} {r['online_samples_per_s']:>10.1f}")
    print(f"  {'ratio cached / online':<36} {r['speedup_cached_vs_online']:>9.2f}x")
    print(f"  padding efficiency (real / padded tokens): grouped {r['padding_efficiency_grouped']:.3f}, "
          f"ungrouped {r['padding_efficiency_ungrouped']:.3f} "
          f"({r['padding_efficiency_grouped'] / r['padding_efficiency_ungrouped']:.2f}x)")
    _print_gpu_target(r)


# ----------------------------------------------------------------------------- infer


def bench_infer(args: argparse.Namespace) -> dict:
    """Teacher, merged and unmerged LoRA student, a plain model of the student's shape and, on
    CPU, the merged student quantised to int8 (dynamic), through the final stage's benchmark."""
    from kdray.config import RunConfig
    from kdray.evaluate.benchmark import benchmark
    from kdray.train.models import build_model, build_student

    device = torch.device(args.device)
    setup = bench_setup(args)
    k, spec = setup["num_labels"], setup["student"]

    def unmerged() -> torch.nn.Module:
        model = build_student(spec, k, seed=0)
        for name, p in model.named_parameters():  # LoRA B starts at zero: give it weights to merge
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        return model

    loaders = {
        "teacher": lambda: build_model(setup["teacher"], k, seed=0),
        "student": lambda: unmerged().merge_and_unload(),
        "student_unmerged": unmerged,
        "plain": lambda: build_model(spec, k, seed=0),
    }
    if device.type == "cpu":
        loaders["student_int8"] = lambda: torch.ao.quantization.quantize_dynamic(
            unmerged().merge_and_unload(), {torch.nn.Linear}, dtype=torch.qint8)
    cfg = RunConfig()
    cfg.final.latency_runs, cfg.final.warmup_runs = args.runs, args.warmup
    test = setup["test"]
    bench, logits = benchmark({n: (load, test, setup["pad_id"]) for n, load in loaders.items()}, device, cfg)
    out = {"benchmark": "infer", "settings": {"sizes": args.sizes, "models": setup["describe"],
                                              "test_examples": len(test), "latency_runs": args.runs,
                                              "warm_up": "batch 1: --warmup passes per model; batch 32: on CUDA an "
                                                         "untimed pass over every batch shape per model first; "
                                                         "latency round-robin over the models"},
           "environment": _environment(device), "models": bench,
           "speedup_student_vs_teacher_p50": bench["teacher"]["latency_ms_p50"] / bench["student"]["latency_ms_p50"],
           "merged_vs_plain_p50": bench["student"]["latency_ms_p50"] / bench["plain"]["latency_ms_p50"],
           "unmerged_vs_merged_p50": bench["student_unmerged"]["latency_ms_p50"] / bench["student"]["latency_ms_p50"]}
    if "student_int8" in bench:
        out["int8_vs_merged_p50"] = bench["student_int8"]["latency_ms_p50"] / bench["student"]["latency_ms_p50"]
        agree = float((logits["student_int8"].argmax(-1) == logits["student"].argmax(-1)).mean())
        out["int8_prediction_agreement"] = agree
    return out


def print_infer(r: dict) -> None:
    print(f"infer benchmark on {r['environment']['device_name']}: {r['settings']['models']}; "
          f"{r['settings']['test_examples']} examples, batch 1 x {r['settings']['latency_runs']} (round-robin), batch 32")
    print(f"  {'model':<18} {'p50 ms':>8} {'p95 ms':>8} {'ex/s @32':>9} {'MB':>7} {'params':>12}")
    for name, b in r["models"].items():
        print(f"  {name:<18} {b['latency_ms_p50']:>8.2f} {b['latency_ms_p95']:>8.2f} {b['throughput_per_s']:>9.0f} "
              f"{b['size_mb']:>7.1f} {b['total_params']:>12,}")
    print(f"  student vs teacher at batch 1: {r['speedup_student_vs_teacher_p50']:.2f}x faster; merged / plain "
          f"{r['merged_vs_plain_p50']:.3f}; unmerged / merged {r['unmerged_vs_merged_p50']:.3f}")
    if "int8_vs_merged_p50" in r:
        print(f"  int8 dynamic / fp32 merged: {r['int8_vs_merged_p50']:.3f} at p50, predictions agree on "
              f"{100 * r['int8_prediction_agreement']:.1f}%")
    if r["environment"]["device"] == "cpu":
        print("  on a GPU: throughput is timed after a warm pass over every batch shape (CUDA loads and picks "
              "kernels per shape); this run was on the CPU, where there is no such warm-up to pay")


# ----------------------------------------------------------------------------- overhead


def trial_timings(search_dir: Path) -> list[dict]:
    """Per trial, from Tune's `result.json`: wall time, time in the training loop (training
    steps + validation, as the workers reported them), epochs, start and end (unix seconds)."""
    from kdray import metrics as M

    out = []
    for result in sorted(search_dir.glob("*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not rows:
            continue
        loop = sum(r.get(M.EPOCH_SECONDS, 0.0) + r.get(M.EVAL_SECONDS, 0.0) for r in rows)
        wall = rows[-1]["time_total_s"]
        end = rows[-1]["timestamp"]
        out.append({"trial_id": rows[-1]["trial_id"], "wall_s": wall, "loop_s": loop, "epochs": len(rows),
                    "start": end - wall, "end": end,
                    "curve": [(r["timestamp"], r[M.VAL_ACCURACY]) for r in rows if M.VAL_ACCURACY in r]})
    return out


def overhead_stats(trials: list[dict], slots: int) -> dict:
    """Per-trial fixed cost (wall minus training loop) and the share of the search's wall time
    the `slots` trial slots spent in training loops."""
    wall = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    fixed = [t["wall_s"] - t["loop_s"] for t in trials]
    return {"fixed_cost_s_mean": float(np.mean(fixed)), "fixed_cost_s_per_trial": fixed,
            "fixed_share_of_trial_time": float(sum(fixed) / sum(t["wall_s"] for t in trials)),
            "busy_share_of_search_wall": float(sum(t["loop_s"] for t in trials) / (wall * slots)),
            "search_wall_s": wall, "epochs": sum(t["epochs"] for t in trials)}


def bench_overhead(args: argparse.Namespace) -> dict:
    import yaml

    run = Path(args.run)
    trials = trial_timings(run / "search")
    if not trials:
        from kdray.errors import UserError

        raise UserError(f"--run {args.run}: no trial results under search/. Fix: pass a run directory of a search.")
    slots = yaml.safe_load((run / "config.yaml").read_text())["search"]["concurrency"]
    summary = json.loads((run / "search" / "summary.json").read_text()) if (run / "search" / "summary.json").is_file() else {}
    return {"benchmark": "overhead", "settings": {"run": str(run), "trials": len(trials), "concurrency": slots},
            "environment": _environment(torch.device("cpu")), **overhead_stats(trials, slots),
            "gpu": summary.get("gpu") or {"gpu_busy_mean_pct": None, "why": "the run recorded no GPU samples"}}


def print_overhead(r: dict) -> None:
    print(f"overhead of {r['settings']['run']}: {r['settings']['trials']} trials, {r['epochs']} trial-epochs, "
          f"concurrency {r['settings']['concurrency']}, search wall {r['search_wall_s']:.0f}s")
    print(f"  per-trial fixed cost (wall - training loop): {r['fixed_cost_s_mean']:.1f}s on average (target <= 3 s) = "
          f"{100 * r['fixed_share_of_trial_time']:.1f}% of trial time")
    print(f"  trial slots busy in the training loop: {100 * r['busy_share_of_search_wall']:.1f}% of the search's "
          f"wall time (target >= 85%)")
    g = r["gpu"]
    print(f"  GPU busy (NVML, each trial's own GPU): {g['gpu_busy_mean_pct']:.0f}% on average (target >= 80%)"
          if g["gpu_busy_mean_pct"] is not None else f"  GPU busy: needs a GPU ({g.get('why')})")


# ----------------------------------------------------------------------------- search: kdray vs the peer


def bench_search(args: argparse.Namespace) -> dict:
    """Both systems on the default space's data, teacher and student, the same search space,
    trials and epochs. The peer: `Trainer.hyperparameter_search(backend="optuna")` with a KD
    `Trainer` running the (same, fine-tuned) teacher on every batch, random batches padded per
    batch, one trial at a time. kdray: its search as shipped (cached logits, length-grouped
    batches, Ray Tune trials at `search.concurrency`, ASHA). Teacher fine-tuning is shared and
    not timed; kdray's one-off teacher-logits pass is added to its time."""
    import tempfile

    from kdray.config import load_config
    from kdray.data.load import load_data
    from kdray.runtime.cluster import start
    from kdray.stages.pipeline import teacher_and_inputs
    from kdray.train.models import encoder_count

    trials, epochs = (4, 1) if args.quick else (args.trials, args.epochs)
    # No transfer set: the peer trains on the labelled rows only, so kdray's trials do too (a
    # transfer set would make kdray's KD epochs longer, not its engine slower).
    overrides = [f"search.trials={trials}", f"space.epochs=[{epochs}]", "data.unlabeled=null", *args.overrides]
    cfg = load_config(args.space, overrides, budget=args.budget)
    task = load_data(cfg.data)
    n_layers = encoder_count(cfg.student, task.num_labels)
    plan = start(cfg, None)
    from kdray.artifacts import RunDir
    from kdray.stages.search import run_search

    with tempfile.TemporaryDirectory(prefix="kdray-bench-search-") as tmp:
        work = Path(tmp)
        teacher, inputs, students = teacher_and_inputs(cfg, task, plan, work / "kdray" / cfg.name)
        print(f"== peer: HF Trainer.hyperparameter_search(optuna), {trials} trials x {epochs} epoch(s), teacher online")
        peer = run_peer(cfg, task, teacher, n_layers, trials, work / "peer")
        print(f"== kdray: {trials} trials x {epochs} epoch(s), concurrency {cfg.search.concurrency}")
        t0 = time.perf_counter()
        result = run_search(cfg, task, RunDir(work / "kdray" / cfg.name), n_layers, inputs, students)
        seconds = time.perf_counter() - t0 + teacher.record["logits_seconds"]
        timing = trial_timings(work / "kdray" / cfg.name / "search")
    start = min(t["start"] for t in timing)
    kd = {"wall_s": seconds, "logits_s": teacher.record["logits_seconds"],
          "overhead": overhead_stats(timing, cfg.search.concurrency), "gpu": result.summary.gpu,
          "trial_epochs": sum(r.epochs_run for r in result.rows),
          "best_val_accuracy": max(r.best_val_accuracy or 0 for r in result.rows),
          "curve": _best_so_far([(ts - start + teacher.record["logits_seconds"], acc)
                                 for t in timing for ts, acc in t["curve"]])}
    for side in (peer, kd):
        side["trial_epochs_per_hour"] = side["trial_epochs"] / side["wall_s"] * 3600
    out = {"benchmark": "search",
           "settings": {"space": Path(cfg.source_file).stem, "quick": args.quick, "trials": trials, "epochs": epochs,
                        "train_examples": len(task.splits["train"]), "concurrency": cfg.search.concurrency,
                        "budget": cfg.budget, "teacher": cfg.teacher.name, "student": cfg.student.name,
                        "student_keep_layers": cfg.student.keep_layers, "student_init": cfg.student.init},
           "environment": _environment(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
           "peer": peer, "kdray": kd,
           "wall_ratio": peer["wall_s"] / kd["wall_s"],
           "trial_epochs_per_hour_ratio": kd["trial_epochs_per_hour"] / peer["trial_epochs_per_hour"],
           "best_val_accuracy_diff_pt": 100 * (kd["best_val_accuracy"] - peer["best_val_accuracy"])}
    _plot_curves(out, Path(args.output_dir) / f"search-{'quick-' if args.quick else ''}{out['environment']['device'].split(':')[0]}.png")
    return out


def bench_predict(args: argparse.Namespace) -> dict:
    """`kdray predict` on each form of a run's student, each in a fresh process, as a user's
    service starts: wall time from launch to the printed labels, and the process's peak RSS.
    The ONNX forms run on onnxruntime and never import torch. Rounds alternate the forms."""
    import subprocess
    import sys

    run = Path(args.run)
    forms = [f for f in ("student", "student-onnx", "student-onnx-int8") if (run / "final" / f).is_dir()]
    texts = ["a gripping, funny and moving film", "a dull mess"]
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True); "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    seconds: dict[str, list[float]] = {f: [] for f in forms}
    peak: dict[str, list[float]] = {f: [] for f in forms}
    for _ in range(args.rounds):
        for form in forms:
            cmd = [sys.executable, "-m", "kdray", "predict", "--model", str(run / "final" / form), *texts]
            wall, rss, code = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                                             check=True).stdout.split()
            if int(code) != 0:
                raise RuntimeError(f"kdray predict failed on {form}")
            seconds[form].append(float(wall))
            peak[form].append(int(rss) / 1024)  # KiB on Linux
    forms_out = {f: {"wall_s_median": float(np.median(seconds[f])), "peak_rss_mb_median": float(np.median(peak[f])),
                     "wall_s": seconds[f], "peak_rss_mb": peak[f]} for f in forms}
    base = forms_out.get("student")
    return {"benchmark": "predict", "settings": {"run": run.name, "rounds": args.rounds, "texts": len(texts)},
            "environment": _environment(torch.device("cpu")), "forms": forms_out,
            "ratios_vs_pytorch": {f: {"wall": base["wall_s_median"] / r["wall_s_median"],
                                      "peak_rss": base["peak_rss_mb_median"] / r["peak_rss_mb_median"]}
                                  for f, r in forms_out.items() if base and f != "student"}}


def print_predict(r: dict) -> None:
    for f, x in r["forms"].items():
        ratio = r["ratios_vs_pytorch"].get(f)
        vs = f"  ({ratio['wall']:.2f}x faster start, {ratio['peak_rss']:.2f}x less memory than PyTorch)" if ratio else ""
        print(f"kdray predict --model final/{f}: {x['wall_s_median']:.2f} s to the labels, peak RSS "
              f"{x['peak_rss_mb_median']:.0f} MB (median of {len(x['wall_s'])}){vs}")


def _best_so_far(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    best, out = -1.0, []
    for t, acc in sorted(points):
        best = max(best, acc)
        out.append((float(t), float(best)))
    return out


def run_peer(cfg: Any, task: Any, teacher: Any, n_layers: int, trials: int, out_dir: Path) -> dict:
    """The usual way: HF Trainer + Optuna, KD loss with the teacher run on every batch."""
    import warnings

    import datasets
    import optuna
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from kdray.stages.searcher import BudgetedSpace
    from kdray.train.loss import kd_loss
    from kdray.train.models import build_student, from_pretrained_dir, load_tokenizer, to_payload
    from kdray.train.precision import resolve_precision
    from kdray.trials import TrialConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(cfg.student)
    datasets.disable_progress_bars()
    enc = task.splits.map(lambda b: tok(b["text"], truncation=True, max_length=cfg.data.max_length), batched=True,
                          remove_columns=[c for c in task.splits["train"].column_names if c != "label"])
    enc = enc.rename_column("label", "labels")
    teacher_model = from_pretrained_dir(teacher.model_dir).to(device).eval()
    base = to_payload(teacher_model) if cfg.student.init == "teacher" else None  # as kdray's trials start
    # The same space as kdray's search (the budget count included, so no over-budget config trains).
    space = BudgetedSpace(cfg.space, cfg.student, task.num_labels, cfg.budget, n_layers)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The space runs twice per trial here (model_init, then hp_space): Optuna keeps the first constraint.
    warnings.filterwarnings("ignore", message="The constraint value is ignored")

    def hp_space(trial: Any) -> dict:
        space(trial)
        return {"learning_rate": trial.params["learning_rate"], "num_train_epochs": trial.params["epochs"]}

    trained = [0]

    def model_init(trial: Any) -> torch.nn.Module:
        if trial is None:
            return build_student(cfg.student, task.num_labels, task.label_names, seed=cfg.seed, base=base)
        # transformers 5 builds the model before it applies hp_space (Optuna repeats the values).
        if not space(trial)["feasible"] or trained[0] >= trials:
            # Over budget or no layer: skipped like kdray skips it; `trials` configurations train.
            if trained[0] >= trials:
                trial.study.stop()
            raise optuna.TrialPruned()
        trained[0] += 1
        student = TrialConfig.from_params(trial.params).student(cfg.student)
        return build_student(student, task.num_labels, task.label_names, seed=cfg.seed, base=base)

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            with torch.no_grad():
                t_logits = teacher_model(**inputs).logits
            p = self._trial.params
            loss, _, _ = kd_loss(outputs.logits, labels, t_logits, p["alpha"], p["temperature"])
            return (loss, outputs) if return_outputs else loss

    points: list[tuple[float, float]] = []
    start = time.perf_counter()
    epochs_done = [0]

    class Clock(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            points.append((time.perf_counter() - start, metrics["eval_accuracy"]))
            epochs_done[0] += 1

    def accuracy(pred: Any) -> dict:
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = TrainingArguments(output_dir=str(out_dir), eval_strategy="epoch", save_strategy="no", report_to="none",
                             per_device_train_batch_size=cfg.train.batch_size,
                             per_device_eval_batch_size=cfg.train.eval_batch_size, weight_decay=cfg.train.weight_decay,
                             warmup_steps=cfg.train.warmup_ratio, max_grad_norm=cfg.train.max_grad_norm,
                             logging_strategy="no", disable_tqdm=True, seed=cfg.seed, use_cpu=device.type == "cpu",
                             bf16=resolve_precision(device, cfg.train.precision) == "bf16")  # as kdray's trials
    trainer = KDTrainer(model_init=model_init, args=args, train_dataset=enc["train"], eval_dataset=enc["validation"],
                        data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy, callbacks=[Clock()])
    best = trainer.hyperparameter_search(direction="maximize", backend="optuna", hp_space=hp_space,
                                         n_trials=trials + cfg.search.max_rejections,
                                         compute_objective=lambda m: m["eval_accuracy"],
                                         sampler=optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "trial_epochs": epochs_done[0], "best_val_accuracy": max(a for _, a in points),
            "best_run_objective": best.objective, "curve": _best_so_far(points)}


def _plot_curves(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, label in (("peer", "HF Trainer + Optuna, online teacher"), ("kdray", "kdray")):
        pts = r[side]["curve"]  # from the first validation result on; nothing is known before it
        ax.step([t for t, _ in pts] + [r[side]["wall_s"]], [a for _, a in pts] + [pts[-1][1]], where="post",
                marker="o", markevery=list(range(len(pts))), label=f"{label}: done at {r[side]['wall_s']:.0f}s")
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the search started")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_title(f"{r['settings']['trials']} trials x {r['settings']['epochs']} epoch(s) on "
                 f"{r['environment']['device_name']}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    r["plot"] = str(path)


def print_search(r: dict) -> None:
    s = r["settings"]
    print(f"search benchmark: {s['trials']} trials x {s['epochs']} epoch(s), {s['train_examples']:,} train examples, "
          f"{r['environment']['device_name']}")
    print(f"  {'system':<40} {'wall s':>8} {'trial-epochs/h':>15} {'best val acc':>13}")
    for side, label in (("peer", "HF Trainer + Optuna (online teacher)"), ("kdray", "kdray")):
        x = r[side]
        print(f"  {label:<40} {x['wall_s']:>8.0f} {x['trial_epochs_per_hour']:>15.1f} {x['best_val_accuracy']:>13.4f}")
    print(f"  kdray / peer: {r['trial_epochs_per_hour_ratio']:.2f}x trial-epochs per hour, "
          f"{r['wall_ratio']:.2f}x less wall time, best val accuracy {r['best_val_accuracy_diff_pt']:+.1f} pt; "
          f"curve {r.get('plot')}")
    o = r["kdray"]["overhead"]
    print(f"  kdray per-trial fixed cost {o['fixed_cost_s_mean']:.1f}s = {100 * o['fixed_share_of_trial_time']:.1f}% "
          f"of trial time; trial slots busy {100 * o['busy_share_of_search_wall']:.1f}% of the search's wall time")


# ----------------------------------------------------------------------------- the performance table (docs/performance.md)

TABLE_START, TABLE_END = "<!-- bench-table -->", "<!-- /bench-table -->"
#: The page whose table `python bench/bench.py table` writes.
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"


def performance_table(results_dir: Path) -> str:
    """docs/performance.md's table, from the JSON files the bench commands wrote; each row names
    the date, commit and machine of its measurement."""
    rows = ["| what | kdray | the usual way / reference | ratio | measured | command |",
            "|---|---|---|---|---|---|"]

    def load(name: str) -> dict | None:
        p = results_dir / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    for name in ("search-cpu", "search-quick-cpu"):
        r = load(name)
        if r is None:
            continue
        s, k, p = r["settings"], r["kdray"], r["peer"]
        cmd = "python bench/bench.py search" + (" --quick" if s["quick"] else "")
        rows.append(f"| search, {s['trials']} trials x {s['epochs']} epoch(s), {s['train_examples']:,} RT sentences: "
                    f"trial-epochs per hour | {k['trial_epochs_per_hour']:.1f} ({k['wall_s']:.0f} s) | "
                    f"{p['trial_epochs_per_hour']:.1f} ({p['wall_s']:.0f} s; HF Trainer + Optuna, online teacher) | "
                    f"**{r['trial_epochs_per_hour_ratio']:.2f}x** | {_when(r)} | `{cmd}` |")
        rows.append(f"| same search: best validation accuracy | {k['best_val_accuracy']:.4f} | {p['best_val_accuracy']:.4f} "
                    f"| {r['best_val_accuracy_diff_pt']:+.1f} pt | {_when(r)} | `{cmd}` |")
    r = load("step-cpu")
    if r is not None:
        rows.append(f"| KD training step, samples/s ({r['settings']['models'].split(':')[0]}, batch "
                    f"{r['settings']['batch_size']}) | {r['cached_samples_per_s']:.1f} (cached teacher logits) | "
                    f"{r['online_samples_per_s']:.1f} (teacher forward per batch) | "
                    f"**{r['speedup_cached_vs_online']:.2f}x** | {_when(r)} | `python bench/bench.py step` |")
        rows.append(f"| padding efficiency, real / padded tokens (batch {r['settings']['batch_size']}) | "
                    f"{r['padding_efficiency_grouped']:.3f} (length-grouped) | {r['padding_efficiency_ungrouped']:.3f} "
                    f"(random batches) | **{r['padding_efficiency_grouped'] / r['padding_efficiency_ungrouped']:.2f}x** "
                    f"| {_when(r)} | `python bench/bench.py step` |")
    r = load("infer-cpu")
    if r is not None:
        m = r["models"]
        rows.append(f"| latency p50 at batch 1, ms: student (merged) vs teacher | {m['student']['latency_ms_p50']:.2f} | "
                    f"{m['teacher']['latency_ms_p50']:.2f} | **{r['speedup_student_vs_teacher_p50']:.2f}x** | "
                    f"{_when(r)} | `python bench/bench.py infer` |")
        rows.append(f"| latency p50, ms: merged LoRA vs a plain model of the same shape | "
                    f"{m['student']['latency_ms_p50']:.2f} | {m['plain']['latency_ms_p50']:.2f} | "
                    f"{r['merged_vs_plain_p50']:.3f} | {_when(r)} | `python bench/bench.py infer` |")
        rows.append(f"| latency p50, ms: merged vs unmerged LoRA (unmerged / merged) | "
                    f"{m['student']['latency_ms_p50']:.2f} | {m['student_unmerged']['latency_ms_p50']:.2f} | "
                    f"{r['unmerged_vs_merged_p50']:.3f} | {_when(r)} | `python bench/bench.py infer` |")
        if "student_int8" in m:
            rows.append(f"| latency p50, ms: int8 dynamic quantisation vs fp32 merged student | "
                        f"{m['student_int8']['latency_ms_p50']:.2f} | {m['student']['latency_ms_p50']:.2f} | "
                        f"{r['int8_vs_merged_p50']:.3f} ({100 * r['int8_prediction_agreement']:.1f}% same "
                        f"predictions) | {_when(r)} | `python bench/bench.py infer` |")
    r = load("predict-cpu")
    if r is not None:
        f, cmd = r["forms"], "python bench/bench.py predict --run runs/default"
        for form, ratio in r["ratios_vs_pytorch"].items():
            rows.append(f"| `kdray predict` start-up to the labels, s / peak RSS, MB: final/{form} vs final/student "
                        f"(PyTorch) | {f[form]['wall_s_median']:.2f} s / {f[form]['peak_rss_mb_median']:.0f} MB | "
                        f"{f['student']['wall_s_median']:.2f} s / {f['student']['peak_rss_mb_median']:.0f} MB | "
                        f"**{ratio['wall']:.2f}x** / {ratio['peak_rss']:.2f}x | {_when(r)} | `{cmd}` |")
    for name in ("search-cpu", "search-quick-cpu"):
        r = load(name)
        if r is None:
            continue
        o, s = r["kdray"]["overhead"], r["settings"]
        cmd = "python bench/bench.py search" + (" --quick" if s["quick"] else "")
        rows.append(f"| kdray per-trial fixed cost (trial wall - training loop), {s['trials']} x {s['epochs']} search | "
                    f"{o['fixed_cost_s_mean']:.1f} s = {100 * o['fixed_share_of_trial_time']:.1f}% of trial time | "
                    f"target <= 3 s | | {_when(r)} | `{cmd}` |")
        rows.append(f"| kdray trial slots busy in the training loop, same search | "
                    f"{100 * o['busy_share_of_search_wall']:.1f}% of wall time | target >= 85% | | {_when(r)} | `{cmd}` |")
    return "\n".join(rows)


def _when(r: dict) -> str:
    """A measurement's date, commit and machine, from its JSON's environment."""
    e = r.get("environment", {})
    return f"{str(e.get('timestamp', '?'))[:10]}, {e.get('commit', '?')}, {e.get('device_name', '?')}"


def write_table(doc: Path, results_dir: Path) -> bool:
    """Put the table between the markers of docs/performance.md; True when it changed."""
    text = doc.read_text()
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    new = f"{head}{TABLE_START}\n{performance_table(results_dir)}\n{TABLE_END}{tail}"
    doc.write_text(new)
    return new != text


#: What `--help` shows as examples.
EXAMPLES = (
    'python bench/bench.py step',
    'python bench/bench.py search --quick',
    'python bench/bench.py overhead --run runs/default',
    'python bench/bench.py eval --batch-sizes 32 128',
    'python bench/bench.py predict --run runs/default',
)


def main(argv: list[str] | None = None) -> int:
    from kdray.cli.flags import add_space as add_space_arguments
    from kdray.config import PRECISIONS

    ap = argparse.ArgumentParser(prog="python bench/bench.py", description="kdray benchmarks: print numbers, write JSON.",
                                 epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default=str(RESULTS_DIR), help="where the JSON goes (default bench/results)")
    sub = ap.add_subparsers(dest="which", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    st = sub.add_parser("step", help="cached-logits vs online-teacher KD step (samples/s), padding efficiency")
    inf = sub.add_parser("infer", help="teacher vs merged / unmerged / int8 student: latency and throughput")
    for p in (st, inf):
        add_space_arguments(p, "data.max_length=128")
        p.add_argument("--sizes", choices=["embedded", "base"], default="embedded",
                       help="embedded models + Rotten Tomatoes (CPU), or BERT-base / 6-layer configs (GPU)")
        p.add_argument("--max-length", type=int, default=128, help="--sizes base: longest sequence (default 128)")
        p.add_argument("--device", default=device)
    st.add_argument("--steps", type=int, default=20, help="timed steps per mode (default 20)")
    st.add_argument("--rounds", type=int, default=3,
                    help="timed passes over the steps per mode, alternating modes, after one warm pass each (default 3)")
    st.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    st.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="train.precision of both modes (default auto: bf16 where the device has it)")
    inf.add_argument("--runs", type=int, default=100, help="timed batch-1 passes per model (default 100)")
    inf.add_argument("--warmup", type=int, default=10, help="untimed passes first (default 10)")
    ev = sub.add_parser("eval", help="an evaluation pass of the student and the teacher at each batch size")
    add_space_arguments(ev, "data.max_length=64")
    ev.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128], help="(default 32 128)")
    ev.add_argument("--rounds", type=int, default=3, help="timed passes per size, alternating (default 3)")
    ev.add_argument("--device", default=device)
    ov = sub.add_parser("overhead", help="per-trial fixed cost and busy share of a finished search")
    ov.add_argument("--run", required=True, help="run directory (runs/<name>/)")
    se = sub.add_parser("search", help="kdray vs HF Trainer.hyperparameter_search with an online-teacher KD Trainer")
    add_space_arguments(se, "data.max_train_samples=2000")
    se.add_argument("--quick", action="store_true", help="4 trials x 1 epoch (about 10 minutes on 2 CPU cores)")
    se.add_argument("--trials", type=int, default=8, help="trials per system (default 8)")
    se.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    se.add_argument("--budget", type=float, default=None, help="trainable-parameter budget (default: the space's)")
    pr = sub.add_parser("predict", help="kdray predict's start-up time and peak memory on each form of a run's student")
    pr.add_argument("--run", required=True, help="run directory whose final stage wrote the forms (runs/<name>/)")
    pr.add_argument("--rounds", type=int, default=5, help="launches per form, alternating (default 5)")
    sub.add_parser("table", help="rewrite docs/performance.md's table from bench/results/*.json")
    args = ap.parse_args(argv)
    if args.which == "table":
        changed = write_table(PERFORMANCE_DOC, Path(args.output_dir))
        print(f"docs/performance.md: the table {'updated' if changed else 'already up to date'} from {args.output_dir}")
        return 0
    run, show = {"step": (bench_step, print_step), "infer": (bench_infer, print_infer),
                 "overhead": (bench_overhead, print_overhead), "search": (bench_search, print_search),
                 "eval": (bench_eval, print_eval), "predict": (bench_predict, print_predict)}[args.which]
    result = run(args)
    show(result)
    kind = result["environment"]["device"].split(":")[0]
    name = {"search": f"search-{'quick-' if getattr(args, 'quick', False) else ''}{kind}",
            "overhead": f"overhead-{Path(getattr(args, 'run', '')).name}"}.get(args.which, f"{args.which}-{kind}")
    if getattr(args, "sizes", "embedded") == "base":
        name += "-base"
    out = Path(args.output_dir) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from kdray.errors import run_cli

    run_cli(main)
