"""The content-addressed cache for expensive, reusable artefacts (tokenized data, teachers, logits).

An entry is a directory named by a fingerprint of everything that determines its content. It is
written under a temporary name and renamed into place, so a crash never leaves half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


ENV_VAR = "KDRAY_CACHE"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """`override`, else `$KDRAY_CACHE`, else `~/.cache/kdray`; always absolute."""
    root = override if override is not None else os.environ.get(ENV_VAR)
    if root is None:
        root = Path.home() / ".cache" / "kdray"
    return Path(root).expanduser().resolve()


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (dataclasses go through `asdict` first)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached_dir(kind: str, key: str, build: Callable[[Path], None], root: Path | None = None) -> tuple[Path, bool]:
    """Return `(path, hit)` of cache entry `kind/key`, calling `build(tmp_dir)` on a miss.

    `build` writes into an empty temporary directory that is renamed into place on success.
    """
    final = cache_root(root) / kind / key
    if final.is_dir():
        return final, True
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same entry first: theirs is as good
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final, False
