"""The judge on real (tiny) models: a threshold from texts the candidate never trained on,
and gate records grouped by the request that logged them."""

import json

import numpy as np
import pytest

from distill.config import DistillConfig
from distill.dataset import Window
from distill.judge import Judge, request_groups
from distill.offline_labels import OfflineLabels
from distill.splits import normalise
from serving.classify.classifier import Classifier
from serving.contracts.records import EscalationRecord

TEXTS = [f"headline number {i} about {w}" for i, w in enumerate(["markets", "films"] * 30)]


def record(i: int, key: str | None, reason: str = "audit") -> EscalationRecord:
    fields = {"request_key": key} if key else {"schema_version": 2}
    return EscalationRecord(
        record_id=f"r{i}",
        request_id="same-client-id",
        timestamp=0.0,
        text=TEXTS[i],
        reason=reason,
        inclusion_probability=0.5 if reason == "audit" else 1.0,
        labels=["business", "entertainment", "politics", "sport", "tech"],
        student_version="v",
        student_probs=[0.2] * 5,
        scorer="max_prob",
        confidence=0.2,
        threshold=0.5,
        teacher_status="skipped",
        **fields,
    )


def test_records_of_one_request_share_a_group_and_old_ones_stand_alone():
    records = [record(0, "a"), record(1, "a"), record(2, "b"), record(3, None), record(4, None)]
    groups = request_groups(records)
    assert groups[0] == groups[1] != groups[2]
    assert len({groups[3], groups[4], groups[0], groups[2]}) == 4  # never the client's id


@pytest.fixture()
def judge_setup(tiny_pair, tmp_path):
    student, teacher = tiny_pair
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    config = DistillConfig(
        registry=tmp_path / "registry",
        log_dir=tmp_path / "log",
        teacher=teacher,
        traffic=traffic,
        cache_dir=tmp_path / "cache",
        device="cpu",
    )
    labeller = OfflineLabels(Classifier(teacher, device="cpu"), tmp_path / "cache")
    gate = [record(i, f"q{i // 3}") for i in range(42, 54)]
    window = Window([], [], {}, evaluation={"calibration": [], "gate": gate})
    return config, labeller, window, student


def test_the_fallback_calibrates_on_traffic_texts_the_candidate_never_trained_on(judge_setup):
    config, labeller, window, student = judge_setup
    trained = {normalise(t.upper()) for t in TEXTS[:25]}  # normalised: case does not hide them

    judge = Judge(config, labeller, window, trained)
    judged, calibration = judge(student)

    assert not judge.live and judge.traffic_dropped == 25
    assert judge.traffic == TEXTS[25:]
    assert len(calibration.agrees_with_teacher) == len(TEXTS) - 25
    assert "less 25 the candidate trained on" in calibration.source
    assert calibration.kind == "traffic_sample"
    assert judged.threshold == calibration.threshold("max_prob", target_agreement=0.97)
    # the gate records: per-record arrays and one group per request of three
    assert judged.confidence.shape == judged.agrees.shape == (12,)
    assert len(np.unique(judge.gate_set.groups)) == 4


def test_a_traffic_sample_trained_on_whole_is_a_clear_error(judge_setup):
    config, labeller, window, _ = judge_setup
    with pytest.raises(ValueError, match=r"every text of the traffic sample .* was trained on"):
        Judge(config, labeller, window, {normalise(t) for t in TEXTS})
