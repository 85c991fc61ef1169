import numpy as np
import pytest

from distill.evaluate import bootstrap_interval, escalation_needed


def one_hot(labels, k=3, p=0.9):
    out = np.full((len(labels), k), (1 - p) / (k - 1))
    out[np.arange(len(labels)), labels] = p
    return out


def test_escalation_needed_escalates_the_least_confident_wrong_answers():
    teacher = one_hot([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    student = one_hot([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], p=0.9)
    student[[0, 1]] = one_hot([1, 2], p=0.4)  # two wrong answers, the least confident
    gold_rows = np.ones(10, dtype=bool)
    gold = teacher.argmax(1)
    assert escalation_needed(student, teacher, gold_rows, gold, min_agreement=1.0) == pytest.approx(
        0.2
    )
    # 80 % agreement and 20 points of accuracy slack: nothing needs escalating
    assert (
        escalation_needed(student, teacher, gold_rows, gold, accuracy_gap=0.2, min_agreement=0.8)
        == 0.0
    )


def test_a_perfect_student_needs_no_teacher():
    teacher = one_hot([0, 1, 2, 1])
    assert escalation_needed(teacher, teacher, np.ones(4, bool), np.array([0, 1, 2, 1])) == 0.0


def test_bootstrap_interval_brackets_the_figure():
    values = np.random.default_rng(0).uniform(size=500)
    low, high = bootstrap_interval(lambda rows: float(values[rows].mean()), 500)
    assert low < values.mean() < high and high - low < 0.1
