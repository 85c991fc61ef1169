"""The promotion gate: a statistical decision on live traffic, not a comparison of two numbers.

Both students are judged as they would serve, with the scorer serving uses, each at its
own threshold calibrated for the same target agreement with the teacher (on the
calibration split, kept apart from the records judged here). On the gate split's weighted
records, a paired bootstrap gives one-sided bounds at ``confidence``. The candidate is
promoted only when

- its drop in escalation rate exceeds ``min_drop`` at that confidence (lower bound above
  it: a barely changed copy, whose few extra escalations are seen only through the audit
  sample, must not pass on a degenerate interval), and
- the cascade's agreement with the teacher (and its gold accuracy, when the task has a gold
  file) is not worse by more than the non-inferiority margin at that confidence.

Fewer sampled confident records than ``min_sampled`` (an audit fraction of 0 gives none)
is "not enough evidence", never a promotion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.config import GateConfig
from distill.estimate import Bootstrap, CascadeOutcome, Estimate, cascade_outcome
from serving.manifest import Calibration
from serving.scoring import SCORERS


@dataclass(frozen=True)
class EvalSet:
    """The records a figure is estimated on: teacher labels, weights, which were sampled."""

    teacher: np.ndarray  # (n,) label index
    weights: np.ndarray  # (n,) 1 / inclusion probability
    sampled: np.ndarray  # (n,) bool: a sampled confident record

    @classmethod
    def unweighted(cls, labels: np.ndarray) -> EvalSet:
        n = len(labels)
        return cls(np.asarray(labels), np.ones(n), np.ones(n, dtype=bool))


@dataclass(frozen=True)
class StudentFigures:
    version: str
    threshold: float
    escalation_rate: Estimate
    agreement: Estimate  # the cascade's agreement with the teacher
    student_agreement: Estimate  # the student alone
    gold_accuracy: Estimate | None  # the cascade on the gold file

    def as_dict(self) -> dict[str, object]:
        figures = {
            "escalation_rate": self.escalation_rate,
            "cascade_agreement": self.agreement,
            "student_agreement": self.student_agreement,
            "cascade_gold_accuracy": self.gold_accuracy,
        }
        return {
            "version": self.version,
            "threshold": self.threshold,
            **{k: v.as_dict() for k, v in figures.items() if v is not None},
        }


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    current: StudentFigures | None = None
    candidate: StudentFigures | None = None
    escalation_drop: Estimate | None = None  # current - candidate (positive: fewer)
    agreement_change: Estimate | None = None  # candidate - current
    gold_change: Estimate | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"promote": self.promote, "reason": self.reason}
        for name in ("escalation_drop", "agreement_change", "gold_change"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.as_dict()
        for name in ("current", "candidate"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.as_dict()
        return out


def make_calibration(
    student: np.ndarray,
    teacher_labels: np.ndarray,
    source: str,
    *,
    weights: np.ndarray | None = None,
    kind: str = "traffic_sample",
) -> Calibration:
    """A version's calibration: confidences under every scorer, agreement, weights."""
    return Calibration(
        source=source,
        kind=kind,  # type: ignore[arg-type]
        confidences={
            name: [round(float(c), 6) for c in fn(student)] for name, fn in SCORERS.items()
        },
        agrees_with_teacher=(student.argmax(1) == teacher_labels).tolist(),
        weights=None if weights is None else [round(float(w), 6) for w in weights],
    )


@dataclass(frozen=True)
class Judged:
    """One student's probabilities on the gate records and on the gold file."""

    version: str
    threshold: float
    gate_probs: np.ndarray
    gold_probs: np.ndarray | None


def decide(
    current: Judged,
    candidate: Judged,
    records: EvalSet,
    gold: np.ndarray | None,
    teacher_on_gold: np.ndarray | None,
    scorer: str,
    config: GateConfig,
) -> Decision:
    """Judge the candidate against the current student on the gate records (paired)."""
    sampled = int(records.sampled.sum())
    # no sampled record at all (audit fraction 0) is never evidence, even with min_sampled=0:
    # nothing would then be known of the confident traffic
    if len(records.teacher) == 0 or sampled == 0 or sampled < config.min_sampled:
        return Decision(
            False,
            f"not enough evidence: {sampled} sampled confident records in the gate split, "
            f"fewer than min_sampled={config.min_sampled} (raise cascade.audit_fraction or "
            "serve more traffic)",
        )
    boot = Bootstrap(records.weights, records.sampled, config.bootstrap_draws, config.seed)
    level = config.confidence
    one_sided = 2 * level - 1  # the low end of this two-sided interval is a one-sided bound
    cur = cascade_outcome(current.gate_probs, records.teacher, scorer, current.threshold)
    cand = cascade_outcome(candidate.gate_probs, records.teacher, scorer, candidate.threshold)
    drop = boot.difference(cur.escalated, cand.escalated, one_sided)
    agreement = boot.difference(cand.agrees, cur.agrees, one_sided)
    gold_change = None
    gold_figures: list[Estimate | None] = [None, None]
    if gold is not None and teacher_on_gold is not None:
        if current.gold_probs is None or candidate.gold_probs is None:
            raise ValueError("gold labels given but a student has no gold probabilities")
        ones = np.ones(len(gold))
        gold_boot = Bootstrap(ones, ones.astype(bool), config.bootstrap_draws, config.seed)
        right = [
            cascade_outcome(probs, teacher_on_gold, scorer, j.threshold).answer == gold
            for j, probs in ((current, current.gold_probs), (candidate, candidate.gold_probs))
        ]
        gold_change = gold_boot.difference(right[1], right[0], one_sided)
        gold_figures = [gold_boot.estimate(r, level) for r in right]

    def figures(
        judged: Judged, outcome: CascadeOutcome, gold_figure: Estimate | None
    ) -> StudentFigures:
        alone = judged.gate_probs.argmax(1) == records.teacher
        return StudentFigures(
            judged.version,
            judged.threshold,
            boot.estimate(outcome.escalated, level),
            boot.estimate(outcome.agrees, level),
            boot.estimate(alone, level),
            gold_figure,
        )

    failures = []
    if drop.low <= config.min_drop:
        failures.append(
            f"the escalation drop {drop.value:+.1%} is not above {config.min_drop:.1%} at "
            f"{level:.0%} confidence (lower bound {drop.low:+.1%})"
        )
    if agreement.low < -config.agreement_margin:
        failures.append(
            f"cascade agreement may be worse by more than {config.agreement_margin:.1%} "
            f"(change {agreement.value:+.1%}, lower bound {agreement.low:+.1%})"
        )
    if gold_change is not None and gold_change.low < -config.gold_margin:
        failures.append(
            f"gold accuracy may be worse by more than {config.gold_margin:.1%} "
            f"(change {gold_change.value:+.1%}, lower bound {gold_change.low:+.1%})"
        )
    summary = (
        f"escalation {drop.value:+.1%} drop [one-sided {level:.0%} bound {drop.low:+.1%}], "
        f"agreement {agreement.value:+.1%} [bound {agreement.low:+.1%}], "
        f"{sampled} sampled of {len(records.teacher)} gate records"
    )
    promote = not failures
    reason = (
        f"fewer escalations at no worse agreement ({summary})"
        if promote
        else "; ".join(failures) + f" ({summary})"
    )
    return Decision(
        promote,
        reason,
        figures(current, cur, gold_figures[0]),
        figures(candidate, cand, gold_figures[1]),
        drop,
        agreement,
        gold_change,
    )
