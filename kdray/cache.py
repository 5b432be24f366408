"""The content-addressed cache for expensive, reusable artefacts (tokenized data, teachers, logits).

An entry is a directory named by a fingerprint of everything that determines its content. It is
written under a temporary name and renamed into place, so a crash never leaves half an entry, and
it carries a manifest of its files (size and SHA-256): an entry whose files no longer match (cut
short, edited, half-copied by hand) is found at its next use, said so, and rebuilt.
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


#: The manifest every entry carries: each file's size and SHA-256 when it was written.
MANIFEST = ".kdray-manifest.json"


def cached_dir(kind: str, key: str, build: Callable[[Path], None], root: Path | None = None) -> tuple[Path, bool]:
    """Return `(path, hit)` of cache entry `kind/key`, calling `build(tmp_dir)` on a miss.

    `build` writes into an empty temporary directory that is renamed into place on success. An
    entry that fails its manifest is rebuilt, with a line that says so.
    """
    final = cache_root(root) / kind / key
    if final.is_dir():
        why = damage(final)
        if why is None:
            return final, True
        print(f"cache: the {kind} entry {final} is damaged ({why}); rebuilding it", flush=True)
        shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(tmp), indent=1))
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished the same entry first: theirs is as good
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final, False


def damage(entry: Path) -> str | None:
    """Why `entry` is not what was written (a file missing, of another size or content), or None."""
    try:
        written = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}: written by an older kdray, or cut short"
    now = _manifest(entry)
    for name, (size, digest) in written.items():
        if name not in now:
            return f"{name} is missing"
        if now[name][0] != size:
            return f"{name} has {now[name][0]:,} bytes, {size:,} when written"
        if now[name][1] != digest:
            return f"{name} changed since it was written"
    return None


def _manifest(entry: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for f in sorted(p for p in entry.rglob("*") if p.is_file() and p.name != MANIFEST):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        out[str(f.relative_to(entry))] = (f.stat().st_size, h.hexdigest())
    return out
