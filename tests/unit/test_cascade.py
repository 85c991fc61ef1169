import numpy as np
import pytest

from serving.classify.decision import decide, make_output, make_record

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


def record(**overrides):
    fields = dict(
        request_id="client-chosen-id",
        request_key="server-made-key",
        text="t",
        reason="audit",
        inclusion_probability=0.02,
        labels=LABELS,
        student_version="s1",
        student_probs=PROBS[2],
        scorer="max_prob",
        confidence=0.34,
        threshold=0.5,
        teacher={"version": "t1", "probs": [0.1, 0.1, 0.8]},
    )
    return make_record(**(fields | overrides))


def test_record_carries_both_distributions_and_the_teachers_label():
    rec = record()
    assert rec.teacher_status == "answered" and rec.teacher_version == "t1"
    assert rec.teacher_probs == [0.1, 0.1, 0.8] and rec.teacher_label == "c"
    assert rec.student_probs == [0.34, 0.33, 0.33] and rec.schema_version == 4
    assert rec.inclusion_probability == 0.02 and rec.evaluable
    assert rec.request_id == "client-chosen-id" and rec.request_key == "server-made-key"


def test_record_ids_are_made_by_the_server():
    first, second = record(), record()  # the same request id twice, e.g. a client retry
    for rec in (first, second):
        assert len(rec.record_id) == 32 and int(rec.record_id, 16) >= 0  # uuid4 hex
        assert "client-chosen-id" not in rec.record_id
    assert first.record_id != second.record_id


@pytest.mark.parametrize("status", ["failed", "timeout", "skipped", "cancelled"])
def test_a_teacher_without_an_answer_leaves_the_teacher_fields_empty(status):
    rec = record(teacher=None, teacher_status=status, reason="low_confidence")
    assert rec.teacher_status == status
    assert rec.teacher_version is None and rec.teacher_probs is None and rec.teacher_label is None
    assert rec.inclusion_probability == 0.02 and rec.student_probs == [0.34, 0.33, 0.33]


def test_an_answer_wins_over_a_stale_status():
    rec = record(teacher_status="failed")  # the teacher did answer
    assert rec.teacher_status == "answered" and rec.teacher_label == "c"
