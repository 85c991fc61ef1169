import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from distill.losses import distillation_loss, soften

GOLDEN = json.loads((Path(__file__).parent / "golden" / "distillation_loss.json").read_text())
torch.manual_seed(1)
LOGITS = torch.randn(8, 5) * 2
TEACHER = torch.softmax(torch.randn(8, 5) * 3, dim=-1)
LABELS = torch.randint(0, 5, (8,))


def test_zero_soft_loss_when_the_student_already_matches_the_teacher():
    logits = torch.log(TEACHER)
    for temperature in (1.0, 2.0, 5.0):
        loss = distillation_loss(logits, TEACHER, LABELS, temperature=temperature, alpha=1.0)
        assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_alpha_limits_are_the_pure_terms():
    hard = distillation_loss(LOGITS, TEACHER, LABELS, temperature=3.0, alpha=0.0)
    assert hard.item() == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), rel=1e-6)
    soft = distillation_loss(LOGITS, TEACHER, LABELS, temperature=3.0, alpha=1.0)
    kl = F.kl_div(F.log_softmax(LOGITS / 3, -1), soften(TEACHER, 3.0), reduction="batchmean")
    assert soft.item() == pytest.approx(9.0 * kl.item(), rel=1e-6)


def test_mixture_is_linear_in_alpha():
    at = [distillation_loss(LOGITS, TEACHER, LABELS, alpha=a).item() for a in (0.0, 0.25, 1.0)]
    assert at[1] == pytest.approx(0.75 * at[0] + 0.25 * at[2], rel=1e-6)


def test_t_squared_scaling_of_the_soft_term():
    # with temperature T the KL of softened distributions is multiplied by T^2
    for temperature in (1.0, 2.0, 4.0):
        soft = distillation_loss(LOGITS, TEACHER, LABELS, temperature=temperature, alpha=1.0)
        kl = F.kl_div(
            F.log_softmax(LOGITS / temperature, -1),
            soften(TEACHER, temperature),
            reduction="batchmean",
        )
        assert soft.item() == pytest.approx(temperature**2 * kl.item(), rel=1e-6)


def test_soften_at_t1_is_identity_and_flattens_above():
    torch.testing.assert_close(soften(TEACHER, 1.0), TEACHER)
    assert soften(TEACHER, 4.0).max(-1).values.le(TEACHER.max(-1).values + 1e-6).all()


def test_matches_an_independent_numpy_computation():
    case = GOLDEN["cases"][5]  # T=2, alpha=0.5, recomputed by hand below
    logits = np.array(GOLDEN["student_logits"])
    teacher = np.array(GOLDEN["teacher_probs"])
    labels = np.array(GOLDEN["labels"])
    T, alpha = case["temperature"], case["alpha"]

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    student_t, teacher_t = softmax(logits / T), softmax(np.log(teacher) / T)
    kl = (teacher_t * (np.log(teacher_t) - np.log(student_t))).sum(-1).mean()
    ce = -np.log(softmax(logits)[np.arange(len(labels)), labels]).mean()
    assert alpha * T**2 * kl + (1 - alpha) * ce == pytest.approx(case["loss"], rel=1e-5)


@pytest.mark.parametrize(
    "case", GOLDEN["cases"], ids=lambda c: f"T{c['temperature']}-a{c['alpha']}"
)
def test_golden_values(case):
    loss = distillation_loss(
        torch.tensor(GOLDEN["student_logits"]),
        torch.tensor(GOLDEN["teacher_probs"]),
        torch.tensor(GOLDEN["labels"]),
        temperature=case["temperature"],
        alpha=case["alpha"],
    )
    assert loss.item() == pytest.approx(case["loss"], rel=1e-5)


def test_bad_settings_and_mismatched_labels_are_clear():
    with pytest.raises(ValueError, match="temperature must be positive"):
        distillation_loss(LOGITS, TEACHER, LABELS, temperature=0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        distillation_loss(LOGITS, TEACHER, LABELS, alpha=1.5)
    with pytest.raises(ValueError, match="label sets the same"):
        distillation_loss(LOGITS, TEACHER[:, :4], LABELS)
