"""Judging a student version on live traffic, as it would serve.

Each version is rescored on the evaluation records (never read from the log: versions and
thresholds change within a window), and its threshold is calibrated for the target
agreement with the teacher: on the live calibration split, weighted by the inverse of each
record's inclusion probability, when that split holds enough sampled records; else on the
task's traffic sample, less every text the candidate trained on (a threshold calibrated on
texts the model just learned comes out too low: it would serve below the target). The
gate split, kept apart, is what the gate judges; its records are grouped by the request
that logged them, so the bootstrap resamples requests.
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
from distill.splits import normalise
from distill.tables import read_labelled, read_texts
from serving.classify.classifier import Classifier
from serving.classify.scorers import get_scorer
from serving.contracts.manifest import Calibration
from serving.contracts.records import EscalationRecord


def request_groups(records: list[EscalationRecord]) -> np.ndarray:
    """Each record's request, as an index: the server-made request key (schema 3); a record
    of an older schema is a request of its own (the client's request id may be reused)."""
    keys = [getattr(r, "request_key", None) or f"record:{r.record_id}" for r in records]
    return np.unique(np.asarray(keys, dtype=object), return_inverse=True)[1].reshape(-1)


def eval_set(records: list[EscalationRecord]) -> gate.EvalSet:
    """The gate's view of evaluation records: weights, audits, requests."""
    return gate.EvalSet(
        weights=np.array([1 / r.inclusion_probability for r in records]),  # type: ignore[operator]
        sampled=np.array([r.reason == "audit" for r in records], dtype=bool),
        groups=request_groups(records) if records else None,
    )


class Judge:
    """Scores a student version on the evaluation records (rescored, never read from the
    log) and calibrates its threshold for the target agreement: on the live calibration
    split when it holds enough sampled records, else on the task's traffic sample less the
    texts in ``trained_on`` (normalised)."""

    def __init__(
        self,
        config: DistillConfig,
        labeller: OfflineLabels,
        window: Window,
        trained_on: set[str] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        self.config, self.labeller = config, labeller
        self.scorer = get_scorer(config.scorer)
        self.cal_records = labeller.usable(window.evaluation["calibration"])
        self.gate_records = labeller.usable(window.evaluation["gate"])
        self.gate_set = eval_set(self.gate_records)
        self.gate_teacher = (
            labeller.probs(self.gate_records).argmax(1) if self.gate_records else np.zeros(0, int)
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
        self.traffic: list[str] = []
        self.traffic_dropped = 0  # traffic-sample texts left out: the candidate trained on them
        cache = config.scores_dir
        if self.live:
            self.cal_teacher = labeller.probs(self.cal_records).argmax(1)
        else:
            texts = read_texts(config.traffic)  # type: ignore[arg-type]
            self.traffic = [t for t in texts if normalise(t) not in trained_on]
            self.traffic_dropped = len(texts) - len(self.traffic)
            if not self.traffic:
                raise ValueError(
                    f"every text of the traffic sample {config.traffic} was trained on: "
                    "nothing left to calibrate on (serve more traffic so the log's "
                    "calibration split has enough sampled records, or give a traffic "
                    "sample of other texts)"
                )
            self.cal_teacher = cached_probs(
                labeller.teacher, self.traffic, cache, "traffic"
            ).argmax(1)
        self.gold_texts: list[str] = []
        self.gold_labels: np.ndarray | None = None
        self.teacher_gold_correct: np.ndarray | None = None
        if config.gold is not None:
            self.gold_texts, gold = read_labelled(config.gold, labeller.labels)
            self.gold_labels = np.array(gold)
            teacher_on_gold = cached_probs(labeller.teacher, self.gold_texts, cache, "gold")
            self.teacher_gold_correct = teacher_on_gold.argmax(1) == self.gold_labels

    def describe_calibration(self) -> str:
        if self.live:
            return (
                f"{len(self.cal_records)} live records of the calibration split "
                f"({self.cal_sampled} sampled), weighted by 1/inclusion probability"
            )
        return (
            f"{len(self.traffic)} texts of the task's traffic sample, less "
            f"{self.traffic_dropped} the candidate trained on (the log's calibration split "
            f"has {self.cal_sampled} sampled records, fewer than "
            f"{self.config.eval.min_calibration_sampled})"
        )

    def __call__(self, folder: Path) -> tuple[gate.Judged, Calibration]:
        config, cache = self.config, self.config.scores_dir
        student = Classifier(folder, device=config.device, max_tokens=config.train.max_tokens)
        if self.live:
            weights = np.array([1 / r.inclusion_probability for r in self.cal_records])  # type: ignore[operator]
            calibration = gate.make_calibration(
                predict_all(student, [r.text for r in self.cal_records], desc="calibration"),
                self.cal_teacher,
                self.describe_calibration(),
                weights=weights,
                kind="live_traffic",
            )
        else:
            calibration = gate.make_calibration(
                cached_probs(student, self.traffic, cache, "traffic"),
                self.cal_teacher,
                self.describe_calibration(),
            )
        threshold = calibration.threshold(
            config.scorer, target_agreement=config.gate.target_agreement
        )
        gate_probs = predict_all(student, [r.text for r in self.gate_records], desc="gate")
        gold_probs = (
            cached_probs(student, self.gold_texts, cache, "gold") if self.gold_texts else None
        )
        judged = gate.Judged(
            student.version,
            threshold,
            confidence=self.scorer(gate_probs) if len(gate_probs) else np.zeros(0),
            agrees=gate_probs.argmax(1) == self.gate_teacher
            if len(gate_probs)
            else np.zeros(0, bool),
            gold_confidence=None if gold_probs is None else self.scorer(gold_probs),
            gold_correct=None if gold_probs is None else gold_probs.argmax(1) == self.gold_labels,
        )
        return judged, calibration
