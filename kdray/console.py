"""What kdray prints: its own progress lines, and the libraries' chatter only with `--verbose`.

Quiet by default: Ray's start-up and token-auth notices, Tune's experiment box, every trial
process's own output (Ray forwards it to the driver), Optuna's study notices and the datasets
progress bars are off; kdray's progress table says what happens. `--verbose` (or
`KDRAY_VERBOSE=1`) turns all of it back on, for debugging a trial.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


VERBOSE_ENV = "KDRAY_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def configure(verbose_flag: bool = False) -> None:
    """Set kdray's console for this process (and, through the environment, Ray's workers)."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    # Tune's legacy reporter honours RunConfig(verbose=0); the new one still prints its box.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Tune's and Train's warnings are about their own bookkeeping (e.g. a snapshot copy that
    # raced the experiment's end, with a traceback), and their error logs repeat a failed trial's
    # traceback: a failed trial reaches kdray as a result, and its progress line says why.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    logging.getLogger("ray.train").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=r"Argument ``group`` is an experimental feature")


def quiet_optuna() -> None:
    """Optuna sets its own level when first imported: call after importing it."""
    if not verbose():
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)


def ray_init_options() -> dict:
    """`ray.init` options: Ray's own INFO lines and the trial processes' output stay out of
    the console unless verbose (a failed trial's error still reaches kdray through Tune)."""
    if verbose():
        return {"log_to_driver": True}
    return {"log_to_driver": False, "logging_level": logging.WARNING}
