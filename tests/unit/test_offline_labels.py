"""The job's teacher labels: a record this teacher answered keeps its logged answer; every
other record (the call failed, timed out, was skipped or its request was cancelled, or an
older teacher answered) is asked once, in batch, and remembered across runs."""

import numpy as np
from test_escalation_log import record

from distill.offline_labels import OfflineLabels
from serving.classify.classifier import Prediction


class FakeTeacher:
    """Stands in for the loaded teacher: answers label "c" for everything, counting texts."""

    version = "t1"

    def __init__(self) -> None:
        self.labels = ["a", "b", "c"]
        self.asked: list[str] = []

    def predict(self, texts: list[str]) -> Prediction:
        self.asked += texts
        probs = np.tile(np.array([0.1, 0.1, 0.8], dtype=np.float32), (len(texts), 1))
        return Prediction(probs, [False] * len(texts))


def unanswered(i: int, status: str):
    empty = {"teacher_version": None, "teacher_probs": None, "teacher_label": None}
    return record(i, f"text {status}").model_copy(update=empty | {"teacher_status": status})


def test_every_record_without_this_teachers_answer_is_labelled_once(tmp_path):
    records = [record(0, "answered by t1")]  # logged answer [0.1, 0.8, 0.1]
    records.append(record(1, "answered by t0").model_copy(update={"teacher_version": "t0"}))
    records += [
        unanswered(i, s) for i, s in enumerate(["failed", "timeout", "skipped", "cancelled"], 2)
    ]
    teacher = FakeTeacher()
    labels = OfflineLabels(teacher, tmp_path)  # type: ignore[arg-type]
    probs = labels.probs(records)
    assert sorted(teacher.asked) == sorted(r.text for r in records[1:])
    assert probs.argmax(1).tolist() == [1, 2, 2, 2, 2, 2] and labels.asked == 5
    again = OfflineLabels(FakeTeacher(), tmp_path)  # type: ignore[arg-type]  # a later run
    np.testing.assert_array_equal(again.probs(records), probs)
    assert again.asked == 0  # from the score cache
