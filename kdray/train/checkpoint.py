"""A trial's epoch checkpoint: the trainable weights, the optimizer and schedule, and where the
run stands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    epoch: int, history: list[dict]) -> None:
    """Trainable weights only (safetensors), optimizer and schedule, and where the run stands."""
    from safetensors.torch import save_file

    m = unwrap(model)
    save_file({n: p.detach().cpu().contiguous() for n, p in m.named_parameters() if p.requires_grad},
              str(path / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path / "optimizer.pt")
    (path / "state.json").write_text(json.dumps({"epochs_done": epoch, "history": history}, default=float))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    m = unwrap(model)
    weights = load_file(str(path / "trainable.safetensors"))
    result = m.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit this model: {result.unexpected_keys[:3]}")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    if trainable - set(weights):
        raise ValueError(f"checkpoint {path} lacks trainable weights {sorted(trainable - set(weights))[:3]}")
    if optimizer is not None:
        # On the CPU first: a trial checkpointed on a GPU node may resume on a CPU one (or
        # another GPU index); load_state_dict then moves the state to each parameter's device.
        state = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    st = json.loads((path / "state.json").read_text())
    return st["epochs_done"], st["history"]
