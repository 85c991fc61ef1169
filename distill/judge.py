"""Judging a student version on live traffic, as it would serve.

Each version is rescored on the evaluation records (never read from the log: versions and
thresholds change within a window), and its threshold is calibrated for the target
agreement with the teacher: on the live calibration split, weighted by the inverse of each
record's inclusion probability, when that split holds enough sampled records; else on the
task's traffic sample. The gate split, kept apart, is what the gate judges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distill import gate
from distill.config import DistillConfig
from distill.dataset import Window
from distill.eval_sets import cached_probs
from distill.evaluate import predict_all
from distill.offline_labels import OfflineLabels
from distill.tables import read_labelled, read_texts
from serving.classifier import Classifier
from serving.manifest import Calibration


class Judge:
    """Scores a student version on the evaluation records (rescored, never read from the
    log) and calibrates its threshold for the target agreement: on the live calibration
    split when it holds enough sampled records, else on the task's traffic sample."""

    def __init__(self, config: DistillConfig, labeller: OfflineLabels, window: Window) -> None:
        self.config, self.labeller = config, labeller
        self.cal_records = labeller.usable(window.evaluation["calibration"])
        gate_records = labeller.usable(window.evaluation["gate"])
        self.gate_records = gate_records
        self.gate_set = gate.EvalSet(
            teacher=labeller.probs(gate_records).argmax(1) if gate_records else np.zeros(0, int),
            weights=np.array([1 / r.inclusion_probability for r in gate_records]),  # type: ignore[operator]
            sampled=np.array([r.reason == "audit" for r in gate_records], dtype=bool),
        )
        self.cal_sampled = sum(r.reason == "audit" for r in self.cal_records)
        self.live = self.cal_sampled >= config.eval.min_calibration_sampled or (
            config.traffic is None and self.cal_sampled > 0
        )
        if not self.live and config.traffic is None:
            raise ValueError(
                "no calibration data: the log's calibration split holds no sampled records "
                "and the config names no traffic sample (set `traffic`)"
            )
        self.cal_teacher = labeller.probs(self.cal_records).argmax(1) if self.live else None
        self.traffic = [] if self.live else read_texts(config.traffic)  # type: ignore[arg-type]
        cache = config.scores_dir
        if not self.live:
            self.cal_teacher = cached_probs(
                labeller.teacher, self.traffic, cache, "traffic"
            ).argmax(1)
        self.gold_texts: list[str] = []
        self.gold_labels: np.ndarray | None = None
        self.teacher_on_gold: np.ndarray | None = None
        if config.gold is not None:
            self.gold_texts, gold = read_labelled(config.gold, labeller.labels)
            self.gold_labels = np.array(gold)
            self.teacher_on_gold = cached_probs(
                labeller.teacher, self.gold_texts, cache, "gold"
            ).argmax(1)

    def __call__(self, folder: Path) -> tuple[gate.Judged, Calibration]:
        config, cache = self.config, self.config.scores_dir
        student = Classifier(folder, device=config.device, max_tokens=config.train.max_tokens)
        if self.live:
            weights = np.array([1 / r.inclusion_probability for r in self.cal_records])  # type: ignore[operator]
            calibration = gate.make_calibration(
                predict_all(student, [r.text for r in self.cal_records], desc="calibration"),
                self.cal_teacher,  # type: ignore[arg-type]
                f"{len(self.cal_records)} live records of the calibration split "
                f"({self.cal_sampled} sampled), weighted by 1/inclusion probability",
                weights=weights,
                kind="live_traffic",
            )
        else:
            calibration = gate.make_calibration(
                cached_probs(student, self.traffic, cache, "traffic"),
                self.cal_teacher,  # type: ignore[arg-type]
                f"{len(self.traffic)} texts of the task's traffic sample (the log's calibration "
                f"split has {self.cal_sampled} sampled records, fewer than "
                f"{config.eval.min_calibration_sampled})",
            )
        threshold = calibration.threshold(
            config.scorer, target_agreement=config.gate.target_agreement
        )
        gate_probs = predict_all(student, [r.text for r in self.gate_records], desc="gate")
        gold_probs = (
            cached_probs(student, self.gold_texts, cache, "gold") if self.gold_texts else None
        )
        judged = gate.Judged(student.version, threshold, gate_probs, gold_probs)
        return judged, calibration
