"""One distillation (one trial) of a search space's student, through the trial engine.

    kdray distill --space FILE [--set key=value ...] [--workers N] [--seeds N]

The teacher stage runs first (cached). With one worker the loop runs in one Tune trial's
process; with several, on a Ray Train worker group (`kdray.runtime.engine`). `--seeds N` trains the
same configuration with the final stage's seeds (`seed`, `seed + 1`, ...; one teacher) and
prints the mean and spread of the last epoch's validation accuracy: one trial's figure moves
by 1-2 points with its seed alone, so a change to the configuration is judged over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from kdray import metrics as M
from kdray.cli import flags
from kdray.config import load_config


DESCRIPTION = ("Run one distillation (one trial) of a search space's student on Ray and print its per-epoch "
               "metrics. The teacher stage runs first (cached).")
EXAMPLES = (
    'kdray distill --space smoke',
    'kdray distill --space default --set train.alpha=0.3 --set student.lora.r=8',
    'kdray distill --space default --set student.lora.r=32 --seeds 3',
)


def arguments(ap: argparse.ArgumentParser) -> None:
    flags.add_space(ap, "train.alpha=0.3")
    flags.add_cluster(ap, workers=True)
    flags.add_output_dir(ap)
    flags.add_seeds(ap, "train with N seeds (the final stage's: seed, seed+1, ...; one teacher) and print the mean "
                        "and std of the last epoch's validation accuracy (default 1)", default=1)


def run(args: argparse.Namespace) -> int:
    flags.check_seeds(args.seeds)
    cfg = load_config(args.space, args.overrides + flags.worker_overrides(args))
    from kdray.sources import check_models

    check_models(cfg)

    from kdray.data.load import load_data
    from kdray.runtime.cluster import start
    from kdray.stages.pipeline import distill_seeds
    from kdray.train.budget import count

    task = load_data(cfg.data)
    print(f"data: {task.description}")
    print(f"student: {count(cfg.student, task.num_labels):,} trainable parameters; alpha {cfg.train.alpha}, "
          f"T {cfg.train.temperature}, {cfg.train.epochs} epochs, {cfg.resources.workers} worker(s), "
          f"teacher logits {cfg.train.teacher_logits}")
    plan = start(cfg, args.address)
    run_dir = Path(args.output_dir).resolve() / cfg.name
    t0 = time.perf_counter()
    seeds = cfg.repeat_seeds(args.seeds)
    last = []
    for seed, history in zip(seeds, distill_seeds(cfg, task, plan, run_dir, seeds)):
        print_history(history, seed if args.seeds > 1 else None)
        last.append(history[-1][M.VAL_ACCURACY])
    if len(last) > 1:
        print(f"val acc after the last epoch over {len(last)} seeds ({seeds[0]}-{seeds[-1]}): "
              f"mean {statistics.mean(last):.4f}, std {statistics.stdev(last):.4f} "
              f"({', '.join(f'{v:.4f}' for v in last)})")
    print(f"distillation: {time.perf_counter() - t0:.0f}s; checkpoints under {run_dir / 'train'}")
    return 0


def print_history(history: list[dict], seed: int | None) -> None:
    """One run's per-epoch metrics as a table (headed by its seed when several run)."""
    if seed is not None:
        print(f"seed {seed}:")
    print(f"{'epoch':>5} {'train loss':>10} {'ce':>7} {'kd':>7} {'val loss':>8} {'val acc':>7} {'val f1':>7} {'s':>6}")
    for row in history:
        print(f"{row['epoch']:>5} {row[M.TRAIN_LOSS]:>10.4f} {row[M.TRAIN_CE]:>7.4f} {row[M.TRAIN_KD]:>7.4f} "
              f"{row[M.VAL_LOSS]:>8.4f} {row[M.VAL_ACCURACY]:>7.4f} {row[M.VAL_F1]:>7.4f} {row[M.EPOCH_SECONDS]:>6.1f}")
