"""Thresholds that follow the traffic: a drift in the served agreement is detected on the
logged records and a recalibration on them restores the target (the population model of
protege.gate_simulation, the gateway's logging, the real threshold rule)."""

import time
from dataclasses import replace

import numpy as np
import pytest

from distill.recalibrate import next_version, publish_recalibrated, served_agreement
from protege import gate_simulation as sim
from serving.escalation_log import EscalationRecord
from serving.manifest import Calibration, ModelManifest, read_manifest, write_manifest
from serving.registry import Registry
from serving.scoring import should_escalate, threshold_for_agreement

TARGET = 0.97
AUDIT = 0.2


def served_log(population: sim.Population, threshold: float, inputs: int, seed: int):
    """What the gateway logs while version v1 serves at ``threshold``: records whose logged
    student answer agrees with the teacher's (label 0) where the population says so."""
    rng = np.random.default_rng(seed)
    data = population.draw(inputs, rng)
    conf, agrees = data["current_confidence"], data["current_agrees"]
    escalated = should_escalate(conf, threshold)
    audited = ~escalated & (rng.random(inputs) < AUDIT)
    records = []
    for i in np.flatnonzero(escalated | audited):
        records.append(
            EscalationRecord(
                record_id=f"r{seed}-{i}",
                request_id="client-id",  # reused by the client: never the grouping key
                request_key=f"q{seed}-{data['groups'][i]}",
                timestamp=0.0,
                text=f"text {i}",
                reason="low_confidence" if escalated[i] else "audit",
                inclusion_probability=1.0 if escalated[i] else AUDIT,
                labels=["a", "b"],
                student_version="v1",
                student_probs=[0.9, 0.1] if agrees[i] else [0.1, 0.9],
                scorer="max_prob",
                confidence=float(conf[i]),
                threshold=threshold,
                teacher_status="skipped",
            )
        )
    return records, conf[escalated | audited], agrees[escalated | audited]


def agreement_at(population: sim.Population, threshold: float) -> float:
    data = population.draw(200_000, np.random.default_rng(99))
    kept = ~should_escalate(data["current_confidence"], threshold)
    return float(1 - (kept & ~data["current_agrees"]).mean())


def test_drifted_traffic_is_recalibrated_and_the_target_restored():
    before = sim.Population()
    threshold = sim.truth(before)["threshold"]  # calibrated on the traffic of its day
    # new traffic the student is overconfident on: the same threshold agrees less
    drifted = replace(before, sharpness=2.2)
    assert agreement_at(drifted, threshold) < TARGET - 0.01
    records, conf, agrees = served_log(drifted, threshold, 12_000, seed=1)
    teacher = np.zeros(len(records), dtype=int)

    drift = served_agreement(records, teacher, "v1", TARGET, draws=400)

    assert drift is not None and drift.drifted
    assert drift.served.high < TARGET
    weights = np.array([1 / r.inclusion_probability for r in records])
    recalibrated = threshold_for_agreement(conf, agrees, TARGET, weights)
    assert recalibrated > threshold
    assert agreement_at(drifted, recalibrated) == pytest.approx(TARGET, abs=0.01)


def test_undrifted_traffic_is_rarely_recalibrated():
    population = sim.Population()
    threshold = sim.truth(population)["threshold"]
    flagged = 0
    for seed in range(30):
        records, _, _ = served_log(population, threshold, 3000, seed=100 + seed)
        drift = served_agreement(records, np.zeros(len(records), int), "v1", TARGET, draws=200)
        flagged += drift.drifted
    assert flagged <= 4  # a 95 % interval: about 1.5 of 30 by chance


def test_only_the_versions_own_unsteered_records_count():
    population = sim.Population()
    records, _, _ = served_log(population, 0.6, 400, seed=3)
    other = [r.model_copy(update={"student_version": "v0"}) for r in records]
    forced = [r.model_copy(update={"reason": "forced"}) for r in records]
    labels = np.zeros(len(records), int)
    assert served_agreement(other, labels, "v1", TARGET) is None
    assert served_agreement(forced, labels, "v1", TARGET) is None


def test_next_version():
    assert next_version("student-abc") == "student-abc-r1"
    assert next_version("student-abc-onnx-r1") == "student-abc-onnx-r2"
    assert next_version("student-abc-r9") == "student-abc-r10"


def staged(root, version: str):
    folder = root / "staging" / version
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights of " + version.encode())
    write_manifest(
        folder, ModelManifest(version=version, role="student", created_at=time.time(), labels=["a"])
    )
    return folder


def test_a_recalibration_is_published_and_promoted_by_compare_and_set(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.publish(staged(tmp_path, "v1"))
    registry.promote("v1")
    calibration = Calibration(
        source="test split",
        kind="live_traffic",
        confidences={"max_prob": [0.5, 0.9]},
        agrees_with_teacher=[False, True],
        weights=[1.0, 5.0],
    )
    records, _, _ = served_log(replace(sim.Population(), sharpness=2.2), 0.59, 3000, seed=4)
    drift = served_agreement(records, np.zeros(len(records), int), "v1", TARGET, draws=200)

    assert publish_recalibrated(registry, "v1", calibration, drift) == ("recalibrated", "v1-r1")

    assert registry.current() == "v1-r1"
    manifest = read_manifest(registry.path("v1-r1"))
    assert manifest.recalibrated_from == "v1" and manifest.parent == "v1"
    assert manifest.calibration == calibration
    assert manifest.recalibration == drift.as_dict()  # the evidence it rests on
    same = (registry.path(v) / "model.safetensors" for v in ("v1", "v1-r1"))
    assert next(same).read_bytes() == next(same).read_bytes()  # the same weights

    # a rollback to v1 while a run recalibrated it: the next id is free, the pointer stands
    registry.publish(staged(tmp_path, "v2"))
    registry.promote("v2")
    assert publish_recalibrated(registry, "v1", calibration, drift) == ("superseded", "v1-r2")
    assert registry.current() == "v2"
