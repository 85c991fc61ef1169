"""Thresholds that follow the traffic.

A version's threshold was calibrated on the traffic of its day. When the traffic drifts,
its cascade agrees with the teacher on more or less than the target, although nothing was
retrained. The calibration split's records that the current version served *at the
threshold its calibration gives for the gate's target* say so: each was logged with its
inclusion probability, so the weighted share of them on which the cascade agreed (an input
escalated at that threshold always agrees; a kept one agrees when the student's logged
answer is the teacher's) estimates the served agreement over all traffic. When its 95 %
interval (requests resampled whole) lies wholly outside ``target ± margin``, a run that
promotes nothing publishes ``<version>-r<N>``: the same weights with a calibration on
those same records (the version's own logged answers: the traffic since it served), through
the same compare-and-set as a promotion.

Records served at another threshold (a config that serves another target or a fixed
threshold, a per-request override) say nothing about this calibration and are left out;
too few sampled records of the version's own is no evidence (a new version always starts
with few), so nothing is published.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.estimate import Bootstrap, Estimate
from distill.gate import make_calibration
from distill.judge import eval_set
from serving.contracts.manifest import Calibration, read_manifest, write_manifest
from serving.contracts.records import EscalationRecord
from serving.contracts.registry import PointerMoved, Registry
from serving.contracts.threshold import should_escalate

LEVEL = 0.95


@dataclass(frozen=True)
class Drift:
    served: Estimate  # the cascade's agreement at the version's own served threshold
    target: float
    margin: float
    records: list[EscalationRecord]  # the evidence: the version's records at that threshold

    @property
    def drifted(self) -> bool:
        low, high = self.target - self.margin, self.target + self.margin
        return self.served.high < low or self.served.low > high

    def as_dict(self) -> dict[str, Any]:
        return {
            "served_agreement": self.served.as_dict(),
            "target": self.target,
            "margin": self.margin,
        }


def served_records(
    records: list[EscalationRecord], version: str, threshold: float
) -> list[EscalationRecord]:
    """The records ``version`` served at ``threshold`` (its own calibration's)."""
    return [
        r
        for r in records
        if r.student_version == version and np.isclose(r.threshold, threshold, rtol=1e-9)
    ]


def served_agreement(
    records: list[EscalationRecord],
    teacher_labels: np.ndarray,
    threshold: float,
    target: float,
    margin: float,
    draws: int = 1000,
    seed: int = 0,
) -> Drift:
    """The served agreement on ``records`` (one version's, at ``threshold``) with the
    teacher's labels (indices, in the records' label order)."""
    confidence = np.array([r.confidence for r in records], dtype=float)
    student = np.array([int(np.argmax(r.student_probs)) for r in records])
    agrees = should_escalate(confidence, threshold) | (student == np.asarray(teacher_labels))
    records_set = eval_set(records)
    boot = Bootstrap(records_set.weights, records_set.sampled, draws, seed, records_set.groups)
    return Drift(boot.estimate(agrees, LEVEL), target, margin, records)


def recalibration(drift: Drift, teacher_labels: np.ndarray) -> Calibration:
    """The version's calibration on the drift's own records (its logged answers)."""
    records = drift.records
    return make_calibration(
        np.array([r.student_probs for r in records]),
        np.asarray(teacher_labels),
        f"{len(records)} live records the version served at its threshold "
        f"({sum(r.reason == 'audit' for r in records)} sampled), weighted by 1/inclusion "
        "probability",
        weights=np.array([1 / r.inclusion_probability for r in records]),  # type: ignore[operator]
        kind="live_traffic",
    )


def next_version(version: str) -> str:
    """``v`` -> ``v-r1``, ``v-r1`` -> ``v-r2``."""
    match = re.fullmatch(r"(.*)-r(\d+)", version)
    return f"{match[1]}-r{int(match[2]) + 1}" if match else f"{version}-r1"


def publish_recalibrated(
    registry: Registry,
    current: str,
    calibration: Calibration,
    drift: Drift,
    still_held: Any = lambda: True,
) -> tuple[str, str]:
    """Publish the current weights with ``calibration`` and move the pointer to them if it
    still names ``current`` and ``still_held()`` (the run's lease) answers True just before;
    returns (result, version)."""
    source = registry.path(current)
    manifest = read_manifest(source)
    if manifest is None:
        raise ValueError(f"{current} has no manifest")
    version = next_version(current)
    while registry.exists(version):  # an earlier recalibration of the same weights
        version = next_version(version)
    staged = registry.staging_dir() / f"{version}.staging"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(source, staged, ignore=shutil.ignore_patterns("_complete.json"))
    try:
        write_manifest(
            staged,
            manifest.model_copy(
                update={
                    "version": version,
                    "parent": current,
                    "created_at": time.time(),
                    "calibration": calibration,
                    "recalibrated_from": current,
                    "recalibration": drift.as_dict(),
                }
            ),
        )
        registry.publish(staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    if not still_held():
        return "lease-lost", version
    try:
        registry.promote(version, expected=current)
    except PointerMoved:
        return "superseded", version
    return "recalibrated", version
