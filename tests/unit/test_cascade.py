import numpy as np

from serving.cascade import decide, make_output, make_record

PROBS = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.34, 0.33, 0.33]])
LABELS = ["a", "b", "c"]


def test_decide_escalates_below_threshold_with_reason():
    decision = decide(PROBS, "max_prob", 0.5)
    assert decision.escalate.tolist() == [False, True, True]
    assert decision.reason == "low_confidence"
    np.testing.assert_allclose(decision.confidence, [0.9, 0.4, 0.34])


def test_forced_tiers_override_the_threshold():
    teacher = decide(PROBS, "max_prob", 0.0, force_tier="teacher")
    assert teacher.escalate.all() and teacher.reason == "forced"
    student = decide(PROBS, "max_prob", 1.0, force_tier="student")
    assert not student.escalate.any() and student.reason is None


def test_output_names_the_top_label_and_keeps_the_distribution():
    out = make_output(
        PROBS[1], LABELS, confidence=0.4, tier="student", version="s1", escalated=False
    )
    assert out.label == "a" and out.probabilities == {"a": 0.4, "b": 0.35, "c": 0.25}


def test_record_carries_both_distributions_and_the_teachers_label():
    record = make_record(
        request_id="r",
        index=2,
        text="t",
        reason="audit",
        labels=LABELS,
        student_version="s1",
        student_probs=PROBS[2],
        scorer="max_prob",
        confidence=0.34,
        threshold=0.5,
        teacher_version="t1",
        teacher_probs=[0.1, 0.1, 0.8],
    )
    assert record.record_id == "r:2" and record.teacher_label == "c"
    assert record.student_probs == [0.34, 0.33, 0.33] and record.schema_version == 1
