"""Tracking the search in Weights & Biases: one wandb run per trial, written from the driver.
Where the runs go (mode, project, entity) is `kdray.wandb_setup`."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kdray import metrics as M
from kdray.runtime.cluster import NODE_ID
from kdray.trials import TrialConfig
from kdray.wandb_setup import wandb_target


class WandbTrials(Callback):
    """A Tune callback that logs one wandb run per trial (id = trial id, grouped by `group`,
    config = the trial's `TrialConfig` as a trials.parquet row), written from the driver by one
    background thread.

    Ray's `WandbLoggerCallback` starts two Ray actors per trial (a queue and a logger), each a
    new Python process: on 2 cores ~18 s of a 4-trial smoke search went to them, and handing
    results to them had stalled Tune's loop for seconds per result on an H100. Here wandb runs in
    this process (wandb >= 0.19 keeps several runs open at once), and Tune's loop only puts
    items on a queue, so a slow network never holds it up.
    """

    #: Result keys that are not metrics: Tune's config copy, where the trial ran.
    NOT_LOGGED = ("config", NODE_ID, M.PLACEMENT, M.GPU_BUSY_WHY)

    def __init__(self, group: str, run_dir: Path) -> None:
        self.group, self.run_dir = group, run_dir
        self.items: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.failed: str | None = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
        return {"group": self.group, "run_dir": self.run_dir}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _put(self, *item: Any) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="kdray-wandb", daemon=True)
            self.thread.start()
        self.items.put(item)

    def _work(self) -> None:
        import wandb

        (Path(self.run_dir) / "wandb").mkdir(parents=True, exist_ok=True)  # made once a trial starts, not before
        runs: dict[str, Any] = {}
        while (item := self.items.get()) is not None:
            kind, trial_id, payload = item
            try:
                if kind == "start" and trial_id not in runs:
                    runs[trial_id] = wandb.init(**wandb_target(), group=self.group, id=trial_id, name=trial_id,
                                                config=payload, dir=str(self.run_dir), reinit="create_new",
                                                resume="allow")
                elif kind == "log" and trial_id in runs:
                    runs[trial_id].log(payload)
                elif kind == "end" and trial_id in runs:
                    runs.pop(trial_id).finish()
            except Exception as e:  # tracking must never fail the search
                if self.failed is None:
                    self.failed = f"{type(e).__name__}: {e}"
                    print(f"warning: wandb logging failed ({self.failed}); the search goes on without it", flush=True)
        for r in runs.values():
            r.finish()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._put("start", trial.trial_id, TrialConfig.of_tune(trial.config).to_row())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._put("start", trial.trial_id, TrialConfig.of_tune(trial.config).to_row())
        values = {k: v for k, v in result.items()
                  if k not in self.NOT_LOGGED and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._put("log", trial.trial_id, values)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._put("end", trial.trial_id, None)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._put("end", trial.trial_id, None)

    def on_experiment_end(self, trials, **info):
        if self.thread is not None:
            self.items.put(None)
            # Online, the last uploads may take a while; do not hold the search for long.
            self.thread.join(timeout=60)
