"""What a run prints while Tune runs: a line per trial epoch and per finished trial, and the
teacher's epoch lines. Module-level Tune callbacks, like Ray's own `WandbLoggerCallback`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kdray import metrics as M
from kdray.trials import TrialConfig, shape_note


class Progress(Callback):
    """One concise line per trial epoch and per finished trial, named by trial id (the search)
    or by variant and seed (the final stage: `by_variant`). When a trial ends, a status line:
    trials done, running and pending out of `total`, the best validation accuracy so far, elapsed
    time and an ETA (the finished trials' mean wall time over the pending and running work,
    `concurrency` at once).

    Lines are printed at the end of Tune's step, after it has taken its experiment snapshot
    (whose copy to the storage path may still be under way: RAY_NOTES.md)."""

    def __init__(self, total: int | None = None, concurrency: int = 1, by_variant: bool = False) -> None:
        self.total, self.concurrency, self.by_variant = total, concurrency, by_variant
        self.header = False
        self.pending: list[str] = []
        self.t0 = time.monotonic()
        self.started: dict[str, float] = {}
        self.walls: list[float] = []
        self.best: tuple[tuple[float, int], str] | None = None  # ((accuracy, -params), label)
        self.recovering: set[str] = set()
        self.ended: set[str] = set()

    def label(self, trial: Any) -> str:
        return TrialConfig.of_tune(trial.config).label() if self.by_variant else trial.trial_id

    def _line(self, trial: Any, result: dict, status: str) -> None:
        if not self.header:
            self.pending.append(f"{'trial':<16} {'alpha':>5} {'T':>5} {'r':>3} {'layers':<12} {'params':>9} "
                                f"{'epoch':>5} {'val acc':>7}  status")
            self.header = True
        c = TrialConfig.of_tune(trial.config)
        head = c.mode != "lora"
        acc = result.get(M.VAL_ACCURACY)
        # Ties broken as `kdray.stages.search.best_config` breaks them: fewer trainable parameters.
        if acc is not None and (self.best is None or (acc, -c.trainable_params) > self.best[0]):
            self.best = ((acc, -c.trainable_params), self.label(trial))
        self.pending.append(
            f"{self.label(trial):<16} {c.alpha:>5.2f} {c.temperature:>5.2f} {'-' if head else c.lora.r:>3} "
            f"{('all' if head else c.layers_text) + shape_note(c):<12} {c.trainable_params:>9,} "
            f"{result.get(M.EPOCHS_DONE, 0):>5} {acc if acc is None else f'{acc:.4f}':>7}  {status}")

    def _ended(self, trial: Any, trials: list) -> None:
        # Tune marks `trial` TERMINATED only after its callbacks ran: count it here.
        self.ended.add(trial.trial_id)
        now = time.monotonic()
        done = len(self.ended | {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")})
        running = [t for t in trials if t.status == "RUNNING" and t.trial_id not in self.ended]
        n = self.total if self.total is not None else len(trials)
        line = f"-- {done}/{n} trials done, {len(running)} running, {max(0, n - done - len(running))} pending"
        if self.best is not None:
            line += f"; best val acc {self.best[0][0]:.4f} ({self.best[1]})"
        line += f"; {_minutes(now - self.t0)} elapsed"
        if self.walls and done < n:
            mean = sum(self.walls) / len(self.walls)
            left = mean * (n - done) - sum(now - self.started.get(t.trial_id, now) for t in running)
            line += f", about {_minutes(max(0.0, left) / max(1, self.concurrency))} to go"
        self.pending.append(line)

    def _flush(self) -> None:
        if self.pending:
            print("\n".join(self.pending), flush=True)
            self.pending.clear()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.monotonic()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.recovering.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id in self.recovering:  # its first epoch after a retry: where it went on from
            self.recovering.discard(trial.trial_id)
            self.pending.append(f"{self.label(trial)}: retried after a failure (its node or process died); resumed "
                                f"after epoch {result.get(M.EPOCHS_DONE, 1) - 1} from its checkpoint")
        if result.get(M.EPOCHS_DONE, 0) < TrialConfig.of_tune(trial.config).epochs:  # else: its end line
            self._line(trial, result, "running")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        done = result.get(M.EPOCHS_DONE, 0) >= TrialConfig.of_tune(trial.config).epochs
        self._line(trial, result, "completed" if done else "stopped early")
        self.walls.append(time.monotonic() - self.started.get(trial.trial_id, self.t0))
        self._ended(trial, trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, trial.last_result or {}, "failed")
        why = _error_text(trial)
        if why:
            self.pending.append(f"{self.label(trial)}: {why}")
        self._ended(trial, trials)

    def on_step_end(self, iteration, trials, **info):
        self._flush()

    def on_experiment_end(self, trials, **info):
        self._flush()


def _error_text(trial: Any) -> str:
    """A failed trial's error in one line: kdray's own message (a `UserError`, such as a GPU the
    trial holds but cannot use), else the exception's last line."""
    from kdray.errors import UserError

    try:
        error = trial.get_pickled_error()
    except Exception:  # an error that does not unpickle here: its text below
        error = None
    if isinstance(error, UserError):
        return "; ".join(error.problems)
    text = Path(trial.error_file).read_text() if trial.error_file and Path(trial.error_file).is_file() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


class EpochLines(Callback):
    """A line per epoch of a single-trial run (the teacher stage), printed by the driver (the
    trial's own output stays in its process unless --verbose); at most one per `every_s`
    seconds, so a long teacher shows progress and a quick one only its closing line."""

    def __init__(self, prefix: str, every_s: float = 10.0) -> None:
        self.prefix, self.every_s = prefix, every_s
        self.last = time.monotonic()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if M.EPOCH_SECONDS not in result:  # the closing report (logits), not an epoch
            return
        if time.monotonic() - self.last < self.every_s:
            return
        self.last = time.monotonic()
        acc = result.get(M.VAL_ACCURACY)
        print(f"{self.prefix}: epoch {result.get(M.EPOCHS_DONE, '?')}: val acc "
              f"{'-' if acc is None else f'{acc:.4f}'}, {result.get(M.SAMPLES_PER_S, 0):,.0f} samples/s, "
              f"{result.get(M.EPOCH_SECONDS, 0):.0f}s", flush=True)


def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
