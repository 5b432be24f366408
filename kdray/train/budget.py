"""The budget: the exact trainable-parameter count of a student choice, before anything trains.

Budget = parameters with `requires_grad=True` in the exact student that trains, head and PEFT
`modules_to_save` included. Counted by building that student on the `meta` device with the same
builder that builds the real one (`kdray.train.models.build_student`).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

from kdray.config import RunConfig, StudentConfig, origin_of, student_shapes
from kdray.errors import UserError
from kdray.train.models import build_student, count_trainable


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
    """The smallest trainable count any LoRA choice of the space can have: the smallest rank, on the
    fewest layers the space can choose (one, when `space.layers: subset` picks layers; every layer
    otherwise), in any shape and LoRA variant."""
    r = min(cfg.space.lora_r)
    layers = [0] if cfg.space.layers == "subset" else None  # the layers of an encoder are alike
    counts, problems = [], []
    for ts, shape, variant in itertools.product(cfg.space.target_modules, student_shapes(cfg), cfg.space.lora_variant):
        lora = dataclasses.replace(cfg.student.lora, variant=variant)
        student = dataclasses.replace(cfg.student, keep_layers=shape, lora=lora)
        try:
            counts.append(rank_limit(student, num_labels, ts, layers).at(r))
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
    from kdray.data.load import load_data

    return load_data(cfg.data).num_labels
