"""`kdray budget`: the exact trainable-parameter count of the configured student and the
largest LoRA rank within the budget per target-module set."""

from __future__ import annotations

import argparse

from kdray.cli import flags
from kdray.config import LoraChoice, load_config


DESCRIPTION = ("Print the exact trainable-parameter count of the configured student and the largest LoRA rank that "
               "fits the budget for each target-module set of the space.")


def _describe_lora(lora: LoraChoice) -> str:
    layers = "all" if lora.layers is None else ",".join(map(str, lora.layers))
    return f"r={lora.r}, lora_alpha={lora.lora_alpha:g}, targets {','.join(lora.target_modules)}, layers {layers}"


EXAMPLES = (
    'kdray budget --budget 1e6',
    'kdray budget --space imdb_cpu --set student.lora.r=16',
)


def arguments(ap: argparse.ArgumentParser) -> None:
    flags.add_space(ap, "student.lora.r=16")
    flags.add_budget(ap)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.space, args.overrides, budget=args.budget)
    from kdray.sources import check_models
    from kdray.train.budget import count, head_cost, num_labels_of, rank_limit, require_feasible

    check_models(cfg)
    k = num_labels_of(cfg)
    s = cfg.student
    trainable = count(s, k)
    head = head_cost(s, k)
    where = s.name or f"inline {s.config['model_type']} config"
    keep = f", keep_layers {s.keep_layers}" if s.keep_layers is not None else ""
    keep += s.start_text()
    mode = f"lora ({_describe_lora(s.lora)})" if s.mode == "lora" else s.mode
    print(f"student: {where}{keep}, mode {mode}, {k} labels")
    line = f"trainable parameters: {trainable:,}"
    if cfg.budget is not None:
        verdict = "fits" if trainable <= cfg.budget else f"over by {trainable - cfg.budget:,}"
        line += f"  (budget {cfg.budget:,}: {verdict}, {100 * trainable / cfg.budget:.1f}% used)"
    print(line)
    print(f"head alone: {head:,}")
    if cfg.budget is None:
        return 0
    require_feasible(cfg, k)
    layers = "all" if s.lora.layers is None else ",".join(map(str, s.lora.layers))
    print(f"largest LoRA rank within {cfg.budget:,} trainable parameters (layers {layers}):")
    print(f"  {'targets':<24} {'params/rank':>12} {'max r':>6} {'params at max r':>16}")
    for ts in cfg.space.target_modules:
        lim = rank_limit(s, k, ts, s.lora.layers)
        r = lim.max_rank(cfg.budget)
        at = f"{lim.at(r):,}" if r is not None else "-"
        print(f"  {','.join(ts):<24} {lim.per_rank:>12,} {r if r is not None else 'none':>6} {at:>16}")
    return 0
