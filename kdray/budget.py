"""Budget stage: the exact trainable-parameter count of a student choice, before anything trains.

Budget = parameters with `requires_grad=True` in the exact student that trains, head and PEFT
`modules_to_save` included. Counted by building that student on the `meta` device with the same
builder that builds the real one (`kdray.models.build_student`).

    python -m kdray.budget --space FILE [--set key=value ...] [--budget N]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from dataclasses import dataclass

from kdray.config import (LoraChoice, RunConfig, StudentConfig, add_space_arguments, help_epilog, load_config,
                          origin_of, student_shapes)
from kdray.errors import UserError, run_cli
from kdray.models import build_student, count_trainable


def count(student: StudentConfig, num_labels: int) -> int:
    """Exact trainable parameters of `student` (meta device: no memory, milliseconds)."""
    return count_trainable(build_student(student, num_labels, device="meta"))


def head_cost(student: StudentConfig, num_labels: int) -> int:
    """Trainable parameters of the head alone: the floor under every LoRA choice."""
    return count(dataclasses.replace(student, mode="head"), num_labels)


@dataclass
class RankLimit:
    """How a LoRA choice's count grows with rank: `fixed + r * per_rank`."""

    target_modules: list[str]
    layers: list[int] | None
    fixed: int
    """Head (modules_to_save) parameters."""
    per_rank: int
    """Parameters each unit of rank adds: sum of (in + out features) over the adapted linears."""

    def at(self, r: int) -> int:
        return self.fixed + r * self.per_rank

    def max_rank(self, budget: int) -> int | None:
        """Largest rank that fits `budget`, None if even r=1 does not."""
        r = (budget - self.fixed) // self.per_rank
        return int(r) if r >= 1 else None


def rank_limit(student: StudentConfig, num_labels: int, target_modules: list[str],
               layers: list[int] | None) -> RankLimit:
    """Derive the linear law from two real (meta) builds, so it cannot drift from the builder."""
    def at(r: int) -> int:
        lora = dataclasses.replace(student.lora, r=r, target_modules=list(target_modules), layers=layers)
        return count(dataclasses.replace(student, mode="lora", lora=lora), num_labels)

    c1, c2 = at(1), at(2)
    return RankLimit(list(target_modules), layers, fixed=c1 - (c2 - c1), per_rank=c2 - c1)


def smallest_feasible(cfg: RunConfig, num_labels: int) -> int:
    """The smallest trainable count any LoRA choice of the space can have (smallest rank, any shape)."""
    r = min(cfg.space.lora_r)
    counts, problems = [], []
    for ts, shape in itertools.product(cfg.space.target_modules, student_shapes(cfg)):
        student = dataclasses.replace(cfg.student, keep_layers=shape)
        try:
            counts.append(rank_limit(student, num_labels, ts, cfg.student.lora.layers).at(r))
        except UserError as e:  # a module of this choice: name the space's field, not the student's
            problems += [p.replace("student.lora.target_modules", f"space.target_modules {ts}") for p in e.problems]
    if problems:
        raise UserError(sorted(set(problems)), where=origin_of(cfg, "space.target_modules"))
    return min(counts)


def require_feasible(cfg: RunConfig, num_labels: int) -> None:
    """Raise a `UserError` (exit 2) when no choice of the space fits `cfg.budget`."""
    if cfg.budget is None:
        return
    floor = smallest_feasible(cfg, num_labels) if cfg.student.mode == "lora" else count(cfg.student, num_labels)
    if cfg.budget < floor:
        raise UserError(f"budget: {cfg.budget:,} trainable parameters is below the smallest feasible "
                        f"student of this space ({floor:,}: head {head_cost(cfg.student, num_labels):,} plus "
                        f"the cheapest LoRA choice). Fix: --budget {floor:.0f} or more, or a smaller "
                        f"student/head.", where=origin_of(cfg, "budget"))


def num_labels_of(cfg: RunConfig) -> int:
    """Number of classes: declared, else read from the data (cheap for local sources)."""
    if cfg.data.label_names is not None:
        return len(cfg.data.label_names)
    from kdray.data import load_data

    return load_data(cfg.data).num_labels


def _describe_lora(lora: LoraChoice) -> str:
    layers = "all" if lora.layers is None else ",".join(map(str, lora.layers))
    return f"r={lora.r}, alpha={lora.alpha:g}, targets {','.join(lora.target_modules)}, layers {layers}"


#: What `--help` shows as examples.
EXAMPLES = (
    'kdray budget --budget 1e6',
    'kdray budget --space imdb_cpu --set student.lora.r=16',
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="kdray budget", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=help_epilog(*EXAMPLES),
        description=(
        "Print the exact trainable-parameter count of the configured student and the largest LoRA "
        "rank that fits the budget for each target-module set of the space."))
    add_space_arguments(ap, "student.lora.r=16")
    ap.add_argument("--budget", type=float, help="trainable-parameter budget (counts parameters, e.g. 1e6)")
    args = ap.parse_args(argv)
    cfg = load_config(args.space, args.overrides, budget=args.budget)
    from kdray.sources import check_models

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


if __name__ == "__main__":
    run_cli(main)
