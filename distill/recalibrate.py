"""Thresholds that follow the traffic.

A version's threshold was calibrated on the traffic of its day. When the traffic drifts,
its cascade agrees with the teacher on more or less than the target, although nothing was
retrained. The calibration split's records that the current version served say so: each
was logged with its inclusion probability at the threshold it served with, so the weighted
share of them on which the cascade agreed (an escalation always agrees; an audited input
agrees when the student's logged answer is the teacher's) estimates the served agreement
over all traffic. When its 95 % interval (requests resampled whole) excludes the target, a
run that promotes nothing publishes ``<version>-r<N>``: the same weights with a calibration
on that split, through the same compare-and-set as a promotion.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.estimate import Bootstrap, Estimate
from distill.judge import eval_set
from serving.escalation_log import EscalationRecord
from serving.manifest import Calibration, read_manifest, write_manifest
from serving.registry import PointerMoved, Registry

LEVEL = 0.95


@dataclass(frozen=True)
class Drift:
    served: Estimate  # the cascade's agreement at the served thresholds
    target: float

    @property
    def drifted(self) -> bool:
        return not self.served.low <= self.target <= self.served.high

    def as_dict(self) -> dict[str, Any]:
        return {"served_agreement": self.served.as_dict(), "target": self.target}


def served_agreement(
    records: list[EscalationRecord],
    teacher_labels: np.ndarray,
    version: str,
    target: float,
    draws: int = 1000,
    seed: int = 0,
) -> Drift | None:
    """The served agreement of ``version`` on the records it served (None without a
    sampled one: nothing is then known of its confident traffic)."""
    mine = [i for i, r in enumerate(records) if r.student_version == version]
    mine = [i for i in mine if records[i].reason != "forced"]  # steered: not the cascade's
    served = [records[i] for i in mine]
    if not any(r.reason == "audit" for r in served):
        return None
    student = np.array([int(np.argmax(r.student_probs)) for r in served])
    agrees = np.array([r.reason != "audit" for r in served]) | (
        student == np.asarray(teacher_labels)[mine]
    )
    records_set = eval_set(served)
    boot = Bootstrap(records_set.weights, records_set.sampled, draws, seed, records_set.groups)
    return Drift(boot.estimate(agrees, LEVEL), target)


def next_version(version: str) -> str:
    """``v`` -> ``v-r1``, ``v-r1`` -> ``v-r2``."""
    match = re.fullmatch(r"(.*)-r(\d+)", version)
    return f"{match[1]}-r{int(match[2]) + 1}" if match else f"{version}-r1"


def publish_recalibrated(
    registry: Registry, current: str, calibration: Calibration, drift: Drift
) -> tuple[str, str]:
    """Publish the current weights with ``calibration`` and move the pointer to them if it
    still names ``current``; returns (result, version)."""
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
        if not registry.exists(version):
            registry.publish(staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    try:
        registry.promote(version, expected=current)
    except PointerMoved:
        return "superseded", version
    return "recalibrated", version
