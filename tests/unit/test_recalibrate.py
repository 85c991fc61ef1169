"""Thresholds that follow the traffic: the job's check of the current version's served
agreement and its recalibration, on simulated logs (the population model of
protege.gate_simulation and the gateway's logging), a real registry folder and the real
threshold rule. The run's judge, teacher and lease are stand-ins: what is tested is the
decision and what it publishes."""

import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from distill.config import DistillConfig
from distill.job import _follow_traffic
from distill.recalibrate import next_version, publish_recalibrated, served_agreement
from protege import gate_simulation as sim
from serving.contracts.manifest import Calibration, ModelManifest, read_manifest, write_manifest
from serving.contracts.records import EscalationRecord
from serving.contracts.registry import Registry
from serving.contracts.threshold import should_escalate

TARGET = 0.97
AUDIT = 0.2
K = 100  # labels: a max probability as low as 1/K can be written as a distribution
DRIFTED = replace(sim.Population(), sharpness=1.8)  # overconfident on the new traffic


def probs(confidence: float, agrees: bool) -> list[float]:
    """A distribution whose max probability is ``confidence``, on label 0 (the teacher's)
    when the student agrees."""
    c = max(confidence, 1.01 / K)
    row = [(1 - c) / (K - 1)] * K
    row[0 if agrees else 1] = c
    return row


def served_log(population, version: str, threshold: float, inputs: int, seed: int):
    """What the gateway logs while ``version`` serves at ``threshold``."""
    rng = np.random.default_rng(seed)
    data = population.draw(inputs, rng)
    conf, agrees = data["current_confidence"], data["current_agrees"]
    escalated = should_escalate(conf, threshold)
    audited = ~escalated & (rng.random(inputs) < AUDIT)
    return [
        EscalationRecord(
            record_id=f"{version}-{seed}-{i}",
            request_id="client-id",  # reused by the client: never the grouping key
            request_key=f"{version}-{seed}-q{data['groups'][i]}",
            timestamp=0.0,
            text=f"text {i}",
            reason="low_confidence" if escalated[i] else "audit",
            inclusion_probability=1.0 if escalated[i] else AUDIT,
            labels=[f"l{k}" for k in range(K)],
            student_version=version,
            student_probs=probs(float(conf[i]), bool(agrees[i])),
            scorer="max_prob",
            confidence=max(float(conf[i]), 1.01 / K),
            threshold=threshold,
            teacher_status="skipped",
        )
        for i in np.flatnonzero(escalated | audited)
    ]


def agreement_at(population: sim.Population, threshold: float) -> float:
    data = population.draw(200_000, np.random.default_rng(99))
    kept = ~should_escalate(data["current_confidence"], threshold)
    return float(1 - (kept & ~data["current_agrees"]).mean())


def calibration_of_its_day() -> Calibration:
    """v1's calibration: the traffic before the drift (unit weights)."""
    data = sim.Population().draw(20_000, np.random.default_rng(5))
    conf = np.maximum(data["current_confidence"], 1.01 / K)
    return Calibration(
        source="traffic sample",
        confidences={"max_prob": conf.tolist()},
        agrees_with_teacher=data["current_agrees"].tolist(),
    )


@pytest.fixture()
def registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    staged = tmp_path / "staging" / "v1"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"the weights")
    manifest = ModelManifest(
        version="v1",
        role="student",
        created_at=time.time(),
        labels=[f"l{k}" for k in range(K)],
        calibration=calibration_of_its_day(),
    )
    write_manifest(staged, manifest)
    registry.publish(staged)
    registry.promote("v1")
    return registry


class Lease:
    def __init__(self, held: bool = True) -> None:
        self.held, self.asked = held, 0

    def renew(self) -> bool:
        self.asked += 1
        return self.held


def follow(registry, records, lease=None, min_sampled: int = 200):
    config = DistillConfig.model_validate(
        {
            "registry": str(registry.local),
            "log_dir": "unused",
            "teacher": "unused",
            "eval": {"min_calibration_sampled": min_sampled},
            "gate": {"target_agreement": TARGET, "bootstrap_draws": 300},
        }
    )
    judge = SimpleNamespace(cal_records=records)
    teacher = SimpleNamespace(probs=lambda rs: np.tile(np.eye(K)[0], (len(rs), 1)))
    return _follow_traffic(config, registry, "v1", judge, teacher, lease or Lease())


def served_threshold(registry) -> float:
    return registry.manifest("v1").calibration.threshold("max_prob", target_agreement=TARGET)


def test_drifted_traffic_is_recalibrated_on_what_the_version_served(registry):
    threshold = served_threshold(registry)
    assert agreement_at(sim.Population(), threshold) == pytest.approx(TARGET, abs=0.005)
    assert agreement_at(DRIFTED, threshold) < TARGET - 0.02
    # the calibration split pools history: an older version's records of the old traffic
    # and v1's of the drifted traffic; only v1's at its threshold are the evidence
    old = served_log(sim.Population(), "v0", 0.5, 12_000, seed=1)
    mine = served_log(DRIFTED, "v1", threshold, 12_000, seed=2)

    report = follow(registry, old + mine)

    assert report["result"] == "recalibrated", report["reason"]
    assert report["version"] == "v1-r1" and registry.current() == "v1-r1"
    assert report["served_agreement"]["high"] < TARGET - 0.01
    manifest = read_manifest(registry.path("v1-r1"))
    assert manifest.recalibrated_from == "v1" and manifest.recalibration["target"] == TARGET
    assert manifest.calibration.kind == "live_traffic"
    assert len(manifest.calibration.agrees_with_teacher) == len(mine)
    restored = manifest.calibration.threshold("max_prob", target_agreement=TARGET)
    assert agreement_at(DRIFTED, restored) == pytest.approx(TARGET, abs=0.01)
    same = (registry.path(v) / "model.safetensors" for v in ("v1", "v1-r1"))
    assert next(same).read_bytes() == next(same).read_bytes()  # the same weights


def test_undrifted_traffic_is_rarely_recalibrated(registry):
    threshold = served_threshold(registry)
    flagged = 0
    for seed in range(20):
        records = served_log(sim.Population(), "v1", threshold, 8000, seed=100 + seed)
        teacher = np.zeros(len(records), int)
        drift = served_agreement(records, teacher, threshold, TARGET, 0.01, draws=200)
        flagged += drift.drifted
    assert flagged <= 1  # a 95 % interval outside target ± 1 point
    assert follow(registry, records)["result"] == "kept"
    assert registry.current() == "v1"


def test_few_sampled_records_of_its_own_are_no_evidence(registry):
    """Right after a promotion the version has few records: an interval of a handful of
    agreeing audits is [100 %, 100 %], which is no reason to republish."""
    records = served_log(DRIFTED, "v1", served_threshold(registry), 600, seed=3)
    report = follow(registry, records)
    assert report["result"] == "kept" and "fewer than 200" in report["reason"]
    assert registry.current() == "v1" and not registry.exists("v1-r1")


def test_records_served_at_another_threshold_say_nothing(registry):
    """A config serving another target or a fixed threshold: its agreement is off the
    gate's target on purpose."""
    records = served_log(DRIFTED, "v1", 0.5, 12_000, seed=4)
    report = follow(registry, records)
    assert report["result"] == "kept" and "0 sampled" in report["reason"]
    assert registry.current() == "v1"


def test_a_lease_lost_before_the_pointer_moves_promotes_nothing(registry):
    records = served_log(DRIFTED, "v1", served_threshold(registry), 12_000, seed=2)
    lease = Lease()
    answers = iter([True, False])  # held before publishing, lost just before promoting
    lease.renew = lambda: next(answers)  # type: ignore[method-assign]
    report = follow(registry, records, lease)
    assert report["result"] == "lease-lost" and registry.current() == "v1"


def test_next_version():
    assert next_version("student-abc") == "student-abc-r1"
    assert next_version("student-abc-onnx-r1") == "student-abc-onnx-r2"
    assert next_version("student-abc-r9") == "student-abc-r10"


def test_a_pointer_moved_meanwhile_stands(registry, tmp_path):
    records = served_log(DRIFTED, "v1", served_threshold(registry), 3000, seed=6)
    drift = served_agreement(records, np.zeros(len(records), int), 0.6, TARGET, 0.01, 200)
    staged = tmp_path / "staging" / "v2"
    staged.mkdir(parents=True)
    (staged / "model.safetensors").write_bytes(b"other weights")
    write_manifest(staged, ModelManifest(version="v2", role="student", created_at=1, labels=["a"]))
    registry.publish(staged)
    registry.promote("v2")  # a rollout while the run recalibrated v1
    calibration = registry.manifest("v1").calibration
    assert publish_recalibrated(registry, "v1", calibration, drift) == ("superseded", "v1-r1")
    assert registry.current() == "v2"
    assert publish_recalibrated(registry, "v1", calibration, drift)[1] == "v1-r2"  # free id
