"""Distillation losses: pure functions of tensors.

Knowledge distillation (Hinton, Vinyals and Dean, 2015, "Distilling the Knowledge in a
Neural Network"): the student matches the teacher's temperature-softened distribution,
scaled by T^2 so that the soft term's gradients keep their size as T changes, mixed with
ordinary cross-entropy on hard labels.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution ``probs`` would have had at temperature T: softmax(log p / T)."""
    return F.softmax(torch.log(probs.clamp_min(1e-12)) / temperature, dim=-1)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    Shapes: ``student_logits`` (n, k) raw logits; ``teacher_probs`` (n, k) the teacher's
    probabilities at temperature 1 (as logged); ``labels`` (n,) class indices (the gold
    label where known, else the teacher's). Returns the batch mean, a scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher probabilities "
            f"{tuple(teacher_probs.shape)} differ in shape: are the label sets the same?"
        )
    log_student_t = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_t = soften(teacher_probs, temperature)
    kl = F.kl_div(log_student_t, teacher_t, reduction="batchmean")
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * kl + (1.0 - alpha) * hard
