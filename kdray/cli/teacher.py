"""`kdray teacher`: fine-tune the teacher (or find it in the cache) and compute its logits."""

from __future__ import annotations

import argparse
import time

from kdray import metrics as M
from kdray.cli import flags
from kdray.config import load_config


DESCRIPTION = ("Fine-tune the teacher of a search space on Ray Train (or find it in the cache), evaluate it on "
               "validation and compute its logits on train and validation once.")
EXAMPLES = (
    'kdray teacher --space default',
    'kdray teacher --space smoke --set teacher.train.epochs=1',
)


def arguments(ap: argparse.ArgumentParser) -> None:
    flags.add_space(ap, "teacher.train.epochs=1")
    flags.add_cluster(ap, workers=True)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.space, args.overrides + flags.worker_overrides(args))
    from kdray.sources import check_models

    check_models(cfg)
    from kdray.data.load import load_data
    from kdray.stages.teacher import prepare_teacher

    t0 = time.perf_counter()
    task = load_data(cfg.data)
    print(f"data: {task.description}")
    plan = None  # a local run starts Ray only on a cache miss
    if args.address:
        from kdray.runtime.cluster import start

        plan = start(cfg, args.address).teacher
    result = prepare_teacher(cfg, task, plan=plan)
    r = result.record
    print(f"teacher: val accuracy {r[M.VAL_ACCURACY]:.4f}, val f1_macro {r[M.VAL_F1]:.4f}; "
          f"{'cache hit' if result.cache_hit else 'built'} in {time.perf_counter() - t0:.0f}s; {result.path}")
    return 0
