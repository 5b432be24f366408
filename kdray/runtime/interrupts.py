"""Ctrl-C during a Tune run: the run stops the way Tune stops, and the command knows it did.

Tune ends its loop on SIGINT (or SIGUSR1): it snapshots the experiment and leaves the running
trials unfinished, so `Tuner.restore` continues them (ray/tune/tune.py, `_setup_signal_catching`).
But `fit()` then returns as after a finished search, and the caller cannot tell. Here kdray takes
SIGINT and SIGTERM itself for the length of `fit()`, records which came, and hands Tune its own
stop signal (SIGUSR1); the stage then marks the unfinished trials `interrupted` and raises
`kdray.errors.Interrupted`, so no later stage starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Signals:
    """What arrived while Tune ran: the exit status it stands for (130 for SIGINT, 143 for SIGTERM)."""

    code: int | None = None


@contextlib.contextmanager
def tune_interrupts() -> Iterator[Signals]:
    """Within the block SIGINT and SIGTERM stop Tune gracefully and are recorded in the yielded
    `Signals`; the handlers before it are restored after it."""
    seen = Signals()

    def stop(signum: int, frame: object) -> None:
        seen.code = seen.code or 128 + signum
        signal.raise_signal(signal.SIGUSR1)  # Tune's own stop signal: it ends its loop and snapshots

    before_env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # SIGINT is ours; Tune still listens on SIGUSR1
    before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield seen
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        if before_env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = before_env
