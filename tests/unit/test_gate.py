import numpy as np
import pytest

from distill.config import GateConfig
from distill.gate import ModelEval, evaluate, gate, make_calibration

RNG = np.random.default_rng(0)


def eval_with(rate: float, accuracy: float) -> ModelEval:
    return ModelEval("v", 0.8, 0.85, 0.85, rate, accuracy, 0.97)


def test_worse_candidate_is_rejected_with_the_figures():
    ok, why = gate(eval_with(0.20, 0.90), eval_with(0.30, 0.93), GateConfig())
    assert not ok and "accuracy fell" in why and "93.0% -> 90.0%" in why


def test_fewer_escalations_at_equal_accuracy_is_promoted():
    ok, why = gate(eval_with(0.20, 0.93), eval_with(0.30, 0.93), GateConfig())
    assert ok and "fewer escalations" in why


def test_no_margin_no_promotion():
    ok, why = gate(eval_with(0.295, 0.93), eval_with(0.30, 0.93), GateConfig(min_rate_drop=0.01))
    assert not ok and "not better by the margin" in why


def test_more_accurate_at_the_same_rate_is_promoted():
    ok, _ = gate(eval_with(0.30, 0.95), eval_with(0.30, 0.93), GateConfig())
    assert ok


def softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_evaluation_of_a_better_student_shows_fewer_escalations():
    n, k = 3000, 5
    teacher = softmax(RNG.normal(scale=4, size=(n, k)))
    labels = teacher.argmax(1)
    noisy = softmax(np.log(teacher) + RNG.normal(scale=3.0, size=(n, k)))  # a weak student
    close = softmax(np.log(teacher) + RNG.normal(scale=0.5, size=(n, k)))  # a distilled one
    half = n // 2  # calibrate on one half, evaluate on the other
    gold_rows = np.zeros(n - half, dtype=bool)
    gold_rows[:500] = True
    figures = []
    for student in (noisy, close):
        cal = make_calibration(student[:half], teacher[:half], "test")
        figures.append(
            evaluate(
                "v", cal, student[half:], teacher[half:], labels[half:][gold_rows], gold_rows, 0.97
            )
        )
    weak, strong = figures
    assert strong.escalation_rate < weak.escalation_rate
    assert strong.teacher_agreement > weak.teacher_agreement
    for f in figures:
        assert f.cascade_agreement == pytest.approx(0.97, abs=0.03)
    # both cascades sit at the calibrated ~97 %: allow for sampling noise between them
    lenient = GateConfig(accuracy_tolerance=0.03)
    assert gate(strong, weak, lenient)[0] and not gate(weak, strong, lenient)[0]
