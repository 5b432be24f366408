"""Where a run's tracking goes: the wandb mode, login, project and entity, decided once.

Read before Ray starts (the logging actors take `WANDB_MODE` from the environment Ray
forwards) and cheap: no wandb import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kdray.errors import UserError


def wandb_mode_of(arg: str | None) -> str:
    """`--wandb` as given, else online with a wandb login (`WANDB_API_KEY` or `wandb login`),
    else offline. `--wandb online` without a login is a `UserError`: wandb would stop at a prompt."""
    logged_in = wandb_logged_in()
    if arg == "online" and not logged_in:
        raise UserError("--wandb online: no wandb login (WANDB_API_KEY is unset and ~/.netrc has no "
                        "api.wandb.ai entry). Fix: export WANDB_API_KEY=..., run `wandb login`, or use "
                        "--wandb offline and `wandb sync` later.")
    return arg or ("online" if logged_in else "offline")


def wandb_logged_in() -> bool:
    """A wandb API key is at hand: `WANDB_API_KEY`, or the `netrc` entry `wandb login` writes."""
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_target() -> dict[str, str | None]:
    """The wandb project and entity: `WANDB_PROJECT` (default kdray) and `WANDB_ENTITY`."""
    return {"project": os.environ.get("WANDB_PROJECT") or "kdray", "entity": os.environ.get("WANDB_ENTITY") or None}


def wandb_sync_hint(wandb_dir: Path) -> str:
    """What to run to upload an offline run's wandb files."""
    return f"wandb is offline: upload this run with `wandb sync --sync-all {wandb_dir}` (after `wandb login`)"


def trial_logger(group: str, run_dir: Path, exclude: tuple[str, ...] = ()) -> Any:
    """A Tune callback that logs one wandb run per trial (id = trial id, grouped by `group`,
    config = the trial's sampled knobs), written from the driver by one background thread.

    Ray's `WandbLoggerCallback` starts two Ray actors per trial (a queue and a logger), each a
    new Python process: on 2 cores ~18 s of a 4-trial smoke search went to them, and handing
    results to them had stalled Tune's loop for seconds per result on an H100. Here wandb runs in
    this process (wandb >= 0.19 keeps several runs open at once), and Tune's loop only puts
    items on a queue, so a slow network never holds it up.
    """
    import queue
    import threading

    from ray.tune import Callback

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}/"))
            else:
                out[f"{prefix}{k}"] = v
        return out

    class WandbTrials(Callback):
        def __init__(self) -> None:
            self.items: queue.Queue = queue.Queue()
            self.thread: threading.Thread | None = None
            self.failed: str | None = None

        def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment state
            return {}

        def __setstate__(self, state: dict) -> None:
            self.__init__()

        def _put(self, *item: Any) -> None:
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name="kdray-wandb", daemon=True)
                self.thread.start()
            self.items.put(item)

        def _work(self) -> None:
            import wandb

            runs: dict[str, Any] = {}
            while (item := self.items.get()) is not None:
                kind, trial_id, payload = item
                try:
                    if kind == "start" and trial_id not in runs:
                        runs[trial_id] = wandb.init(**wandb_target(), group=group, id=trial_id, name=trial_id,
                                                    config=payload, dir=str(run_dir), reinit="create_new",
                                                    resume="allow")
                    elif kind == "log" and trial_id in runs:
                        runs[trial_id].log(payload)
                    elif kind == "end" and trial_id in runs:
                        runs.pop(trial_id).finish()
                except Exception as e:  # tracking must never fail the search
                    if self.failed is None:
                        self.failed = f"{type(e).__name__}: {e}"
                        print(f"warning: wandb logging failed ({self.failed}); the search goes on without it",
                              flush=True)
            for r in runs.values():
                r.finish()

        def on_trial_start(self, iteration, trials, trial, **info):
            config = {k: v for k, v in flat(trial.config).items() if k not in exclude}
            self._put("start", trial.trial_id, config)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._put("start", trial.trial_id, {k: v for k, v in flat(trial.config).items() if k not in exclude})
            values = {k: v for k, v in flat({k: v for k, v in result.items() if k != "config"}).items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in exclude}
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

    return WandbTrials()
