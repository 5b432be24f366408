"""Where a run's tracking goes: the wandb mode, login, project and entity, decided once.

Read before Ray starts (the logging actors take `WANDB_MODE` from the environment Ray
forwards) and cheap: no wandb import.
"""

from __future__ import annotations

import os
from pathlib import Path

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
