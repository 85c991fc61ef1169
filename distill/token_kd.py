"""Token-level distillation from a logged top-k: the loss of the generative cascade's job.

The log keeps, per answer token, the teacher's k most likely ids and their log-probabilities
(at temperature 1, from the raw logits). At answer token t with logged alternatives K_t:

    p̃_T(i) = softmax over K_t of log p_T(i) / τ        (the top-k at τ, renormalised)
    KL_t   = Σ_{i ∈ K_t} p̃_T(i) (log p̃_T(i) − log p_S(i))
    loss_t = α · KL_t + (1 − α) · CE_t                   (CE on the teacher's token)

where p_S is the student's full-vocabulary softmax at τ. A token without a logged top-k
(a replay row, or the end-of-turn token the teacher's log does not list) has
``loss_t = CE_t``. The batch's loss is the mean over all answer tokens, so every token
counts once, as in :func:`distill.causal_lm.answer_cross_entropy`. TRL's distillation
trainers run a live teacher; this one reads the log, so the loss is the job's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from distill.causal_lm import AnswerLoss, CausalExample


@dataclass(frozen=True)
class TopKExample(CausalExample):
    """A (prompt, answer) pair with the teacher's logged top-k for the first
    ``len(top_ids)`` answer tokens (None: a replay row, trained on cross-entropy only)."""

    top_ids: Sequence[Sequence[int]] | None = None
    top_logprobs: Sequence[Sequence[float]] | None = None

    def __post_init__(self) -> None:
        if (self.top_ids is None) != (self.top_logprobs is None):
            raise ValueError("top_ids and top_logprobs come together")
        if self.top_ids is None or self.top_logprobs is None:
            return
        if len(self.top_ids) != len(self.top_logprobs) or len(self.top_ids) > len(self.answer_ids):
            raise ValueError(
                f"a top-k of {len(self.top_ids)} id rows and {len(self.top_logprobs)} "
                f"log-probability rows cannot cover an answer of {len(self.answer_ids)} tokens"
            )
        for ids, logprobs in zip(self.top_ids, self.top_logprobs, strict=True):
            if not ids or len(ids) != len(logprobs):
                raise ValueError("each top-k position holds as many ids as log-probabilities")


def token_distillation_loss(alpha: float, temperature: float) -> AnswerLoss:
    """The loss above, for :func:`distill.causal_lm.train_causal_lm` (``loss_fn``)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def loss(
        logits: torch.Tensor, targets: torch.Tensor, examples: Sequence[CausalExample]
    ) -> torch.Tensor:
        per_token = F.cross_entropy(logits.float(), targets, reduction="none")
        rows, ids, logprobs = _soft_targets(examples, logits.device)
        if rows.numel() == 0 or alpha == 0.0:
            return per_token.mean()
        valid = ids >= 0
        teacher = torch.where(valid, logprobs / temperature, float("-inf"))
        log_teacher = F.log_softmax(teacher, dim=-1)  # renormalised over the logged k
        student = F.log_softmax(logits[rows].float() / temperature, dim=-1)
        log_student = student.gather(1, ids.clamp_min(0))
        terms = log_teacher.exp() * (log_teacher - log_student)
        kl = torch.where(valid, terms, torch.zeros_like(terms)).sum(-1)
        mixed = alpha * kl + (1.0 - alpha) * per_token[rows]
        return per_token.index_put((rows,), mixed).mean()

    return loss


def _soft_targets(
    examples: Sequence[CausalExample], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows (m,), ids (m, k), log-probabilities (m, k)): the answer positions that carry a
    logged top-k, in the loss's row order; shorter rows padded with id -1."""
    rows: list[int] = []
    ids: list[Sequence[int]] = []
    logprobs: list[Sequence[float]] = []
    offset = 0
    for example in examples:
        top_ids = getattr(example, "top_ids", None)
        top_logprobs = getattr(example, "top_logprobs", None)
        if top_ids is not None and top_logprobs is not None:
            rows += range(offset, offset + len(top_ids))
            ids += top_ids
            logprobs += top_logprobs
        offset += len(example.answer_ids)
    k = max((len(row) for row in ids), default=0)
    id_tensor = torch.full((len(rows), k), -1, dtype=torch.long)
    lp_tensor = torch.zeros((len(rows), k), dtype=torch.float32)
    for j, (row_ids, row_lps) in enumerate(zip(ids, logprobs, strict=True)):
        id_tensor[j, : len(row_ids)] = torch.tensor(list(row_ids), dtype=torch.long)
        lp_tensor[j, : len(row_lps)] = torch.tensor(list(row_lps), dtype=torch.float32)
    return (
        torch.tensor(rows, dtype=torch.long, device=device),
        id_tensor.to(device),
        lp_tensor.to(device),
    )
