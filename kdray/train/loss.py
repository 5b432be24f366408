"""The distillation loss (Hinton 2015), the one definition every trial trains with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdray.data.load import UNLABELED


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
            alpha: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`alpha * CE(s, y) + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))` (Hinton 2015).

    student_logits, teacher_logits: [B, K]; labels: [B]. Returns `(loss, ce, kd)`; the T^2
    factor keeps the soft term's gradients on the scale of the hard term's as T grows.
    `alpha == 1` needs no teacher (the no-KD baseline and the teacher's own fine-tune).
    Rows labelled `UNLABELED` (-1, the transfer set) are left out of CE, which averages over the
    labelled rows (0 when there are none), and kept in KD, which averages over all rows.
    """
    s = student_logits.float()
    # Sum over labelled rows / their count, not `mean`: a batch of transfer rows only would
    # make `mean` 0/0. The count stays on the device (no host sync).
    ce = F.cross_entropy(s, labels, ignore_index=UNLABELED, reduction="sum") / (labels != UNLABELED).sum().clamp(min=1)
    if alpha == 1.0:
        return ce, ce.detach(), torch.zeros((), device=s.device)
    if teacher_logits is None:
        raise ValueError("alpha < 1 needs teacher logits")
    t = teacher_logits.float()
    kd = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  reduction="batchmean", log_target=True) * temperature**2
    return alpha * ce + (1.0 - alpha) * kd, ce.detach(), kd.detach()
