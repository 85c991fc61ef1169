"""The token-level distillation loss against an independent computation (plain Python
over each answer token), the renormalisation of a sparse top-k, the prompt positions
masked, replay rows on cross-entropy only."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_lm import build_tiny_lm

from distill.causal_lm import CausalExample, answer_logits, batch_loss, collate
from distill.token_kd import TopKExample, token_distillation_loss
from serving.generate.models import load_language_model

VOCAB = 11


def log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    total = math.log(sum(math.exp(v - top) for v in values)) + top
    return [v - total for v in values]


def by_hand(logits, targets, examples, alpha: float, tau: float) -> float:
    """The loss, one answer token at a time."""
    losses, row = [], 0
    for example in examples:
        top_ids = getattr(example, "top_ids", None) or []
        top_lps = getattr(example, "top_logprobs", None) or []
        for t in range(len(example.answer_ids)):
            z = [float(v) for v in logits[row]]
            ce = -log_softmax(z)[int(targets[row])]
            if t < len(top_ids):
                log_p = log_softmax([lp / tau for lp in top_lps[t]])  # renormalised at tau
                log_q = log_softmax([v / tau for v in z])
                kl = sum(
                    math.exp(lp) * (lp - log_q[i]) for i, lp in zip(top_ids[t], log_p, strict=True)
                )
                losses.append(alpha * kl + (1 - alpha) * ce)
            else:
                losses.append(ce)
            row += 1
    return sum(losses) / len(losses)


def sparse_top_k(rng: random.Random, k: int) -> tuple[list[int], list[float]]:
    """k distinct ids with log-probabilities of a distribution over the whole vocabulary
    (so they sum to less than 1: the logged top-k is sparse)."""
    weights = [rng.random() ** 3 for _ in range(VOCAB)]
    total = sum(weights)
    ranked = sorted(range(VOCAB), key=lambda i: -weights[i])[:k]
    return ranked, [math.log(weights[i] / total) for i in ranked]


@pytest.mark.parametrize(("alpha", "tau"), [(0.5, 1.0), (0.9, 2.0), (0.0, 1.5), (1.0, 0.7)])
def test_the_loss_is_the_independent_computation(alpha, tau):
    rng = random.Random(7)
    examples = []
    for answer_length, covered, k in ((4, 3, 3), (2, 0, 0), (3, 3, 5)):
        top = [sparse_top_k(rng, k) for _ in range(covered)]
        examples.append(
            TopKExample(
                prompt_ids=[1, 2],
                answer_ids=[rng.randrange(VOCAB) for _ in range(answer_length)],
                top_ids=[ids for ids, _ in top] if covered else None,
                top_logprobs=[lps for _, lps in top] if covered else None,
            )
        )
    examples.append(CausalExample(prompt_ids=[3], answer_ids=[4, 5]))  # a plain replay row
    n = sum(len(e.answer_ids) for e in examples)
    torch.manual_seed(0)
    logits = torch.randn(n, VOCAB, dtype=torch.float64) * 3
    targets = torch.tensor([t for e in examples for t in e.answer_ids])
    got = token_distillation_loss(alpha, tau)(logits, targets, examples)
    assert float(got) == pytest.approx(by_hand(logits, targets, examples, alpha, tau), rel=1e-5)


def test_a_sparse_top_k_is_renormalised():
    """Scaling the logged probabilities (a top-k from a flatter or sharper tail) changes
    nothing: only their ratios count."""
    ids, lps = sparse_top_k(random.Random(1), 4)
    logits = torch.randn(1, VOCAB)
    loss = token_distillation_loss(1.0, 1.0)

    def at(shift: float) -> float:
        example = TopKExample([1], [ids[0]], [ids], [[lp + shift for lp in lps]])
        return float(loss(logits, torch.tensor([ids[0]]), [example]))

    assert at(0.0) == pytest.approx(at(-2.0), rel=1e-6)
    target = torch.tensor([lp for lp in lps]).softmax(0)  # the renormalised top-k
    q = logits[0].log_softmax(0)[ids]
    assert at(0.0) == pytest.approx(float((target * (target.log() - q)).sum()), rel=1e-5)


def test_replay_rows_train_on_cross_entropy_only():
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    targets = torch.tensor([1, 2, 3])
    replay = [CausalExample([9], [1, 2, 3])]
    ce = float(torch.nn.functional.cross_entropy(logits, targets))
    for alpha in (0.0, 0.5, 1.0):
        assert float(token_distillation_loss(alpha, 2.0)(logits, targets, replay)) == (
            pytest.approx(ce)
        )


def test_prompt_positions_carry_no_loss(tmp_path):
    """Through a real model: the loss sees the answer positions only, whatever the prompt
    says and however the rows are padded."""
    lm = load_language_model(build_tiny_lm(tmp_path / "lm", seed=3), device="cpu")
    rng = random.Random(2)
    top = [sparse_top_k(rng, 3) for _ in range(2)]
    answer = [5, 6, 7]

    def example(prompt: list[int]) -> TopKExample:
        return TopKExample(prompt, answer, [i for i, _ in top], [lp for _, lp in top])

    loss = token_distillation_loss(0.5, 2.0)
    short, long = example([10, 11]), example([12, 13, 14, 15, 16])
    pad = int(lm.tokenizer.pad_token_id)
    batch = collate([short, long], pad)
    logits, targets = answer_logits(lm.model, batch)
    assert logits.shape[0] == 2 * len(answer) and targets.tolist() == answer * 2
    full = lm.model(input_ids=torch.tensor([[12, 13, 14, 15, 16, *answer]])).logits[0]
    alone = full[4 : 4 + len(answer)]  # the positions that predict the answer's tokens
    assert torch.allclose(logits[len(answer) :], alone, atol=1e-6)
    left = batch_loss(lm.model, [short, long], pad, "left", loss)
    right = batch_loss(lm.model, [short, long], pad, "right", loss)
    assert float(left.detach()) == pytest.approx(float(right.detach()), rel=1e-6)
    left.backward()  # the loss trains the model
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lm.model.parameters())


def test_a_top_k_longer_than_the_answer_is_refused():
    with pytest.raises(ValueError, match="cannot cover an answer of 1 tokens"):
        TopKExample([1], [2], [[2], [3]], [[-0.1], [-0.2]])
    with pytest.raises(ValueError, match="come together"):
        TopKExample([1], [2], [[2]], None)
    with pytest.raises(ValueError, match="alpha"):
        token_distillation_loss(1.5, 1.0)
