"""The promotion gate: one paired figure on live traffic, not a comparison of two numbers.

Two students calibrated to the same target agreement with the teacher differ in one thing
that matters: the escalation each needs to reach it. On every bootstrap resample of the
gate records (weighted by 1/inclusion probability; the records of one request drawn
together), each student's threshold for the target is found again within the resample and
the weighted share it escalates is taken (:mod:`distill.needed`); the figure is current
minus candidate, both on the same draws, so the optimism of calibrating and measuring on
one sample cancels. The candidate is promoted when the figure's one-sided lower bound at
``confidence`` exceeds ``min(min_drop, min_relative_drop x the current's figure)``: a
student already near zero escalation can still be replaced. When the current student needs
no escalation at all, the figure is instead the student-alone agreement gain, promoted when
its lower bound is above 0.

Two checks guard what the candidate would actually serve:

- at the threshold it would serve with (calibrated on texts it never trained on), its
  cascade agreement on the gate records must not be *shown* to fall short: a one-sided
  upper bound below ``target - agreement_margin`` refuses it (evidence of harm, never noise
  centred at zero);
- with a gold file, its cascade gold accuracy (each student at its served threshold) must
  not be worse by more than ``gold_margin`` at that confidence (non-inferiority).

The functions take per-record arrays (confidence, agreement with the teacher, weight,
request group), never class probabilities, so every task kind uses them unchanged. Fewer
sampled confident records than ``min_sampled`` (an audit fraction of 0 gives none) is "not
enough evidence", never a promotion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distill.config import GateConfig
from distill.estimate import Bootstrap, Estimate
from distill.needed import escalation_needed
from serving.classify.scorers import SCORERS
from serving.contracts.manifest import Calibration
from serving.contracts.manifest import make_calibration as calibration_from
from serving.contracts.threshold import should_escalate


@dataclass(frozen=True)
class EvalSet:
    """The gate records' weights (1 / inclusion probability), which were sampled confident
    inputs (audits), and the request each came from (None: one request per record)."""

    weights: np.ndarray
    sampled: np.ndarray
    groups: np.ndarray | None = None

    @classmethod
    def unweighted(cls, n: int) -> EvalSet:
        return cls(np.ones(n), np.ones(n, dtype=bool))

    def __len__(self) -> int:
        return len(self.weights)


@dataclass(frozen=True)
class Judged:
    """One student as it would serve, in per-record arrays: its confidence (the serving
    scorer) and whether its own answer agrees with the teacher's, on the gate records; and
    on the gold file (when there is one) its confidence and whether its answer is right."""

    version: str
    threshold: float  # the threshold it would serve with
    confidence: np.ndarray
    agrees: np.ndarray
    gold_confidence: np.ndarray | None = None
    gold_correct: np.ndarray | None = None


@dataclass(frozen=True)
class StudentFigures:
    version: str
    threshold: float
    escalation_needed: Estimate  # for the target agreement, calibrated within each resample
    escalation_rate: Estimate  # at the served threshold
    agreement: Estimate  # the cascade's agreement with the teacher at the served threshold
    student_agreement: Estimate  # the student alone
    gold_accuracy: Estimate | None  # the cascade on the gold file

    def as_dict(self) -> dict[str, object]:
        figures = {
            "escalation_needed": self.escalation_needed,
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
    # the paired figure: escalation needed for the target, current - candidate (positive:
    # the candidate needs the teacher less); its bound must exceed `required_drop`
    escalation_drop: Estimate | None = None
    required_drop: float | None = None
    # the figure instead when the current student needs no escalation: candidate - current
    student_agreement_gain: Estimate | None = None
    served_agreement: Estimate | None = None  # the candidate's, one-sided bounds
    gold_change: Estimate | None = None  # candidate - current

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"promote": self.promote, "reason": self.reason}
        if self.required_drop is not None:
            out["required_drop"] = round(self.required_drop, 6)
        for name in (
            "escalation_drop",
            "student_agreement_gain",
            "served_agreement",
            "gold_change",
        ):
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
    """A classification version's calibration from its probabilities: confidences under
    every scorer, agreement with the teacher's labels, weights."""
    return calibration_from(
        {name: fn(student) for name, fn in SCORERS.items()},
        student.argmax(1) == teacher_labels,
        source,
        weights=weights,
        kind=kind,
    )


def cascade_agrees(judged: Judged) -> tuple[np.ndarray, np.ndarray]:
    """(escalated, cascade agrees) per gate record at the student's served threshold: an
    escalated input is answered by the teacher, so it agrees."""
    escalated = should_escalate(judged.confidence, judged.threshold)
    return escalated, escalated | np.asarray(judged.agrees, dtype=bool)


def needed_figure(
    boot: Bootstrap, judged: Judged, target: float, level: float
) -> tuple[Estimate, np.ndarray]:
    """A student's escalation needed for ``target``, with its interval and its draws."""
    args = (judged.confidence, judged.agrees, boot.weights, target)
    value = float(escalation_needed(*args)[0])
    draws = np.concatenate([escalation_needed(*args, counts=c) for c in boot.record_counts()])
    return boot.summarise(value, draws, level), draws


def decide(
    current: Judged,
    candidate: Judged,
    records: EvalSet,
    config: GateConfig,
    teacher_gold_correct: np.ndarray | None = None,
) -> Decision:
    """Judge the candidate against the current student on the gate records (paired)."""
    sampled = int(np.sum(records.sampled))
    # no sampled record at all (audit fraction 0) is never evidence, even with min_sampled=0:
    # nothing would then be known of the confident traffic
    if len(records) == 0 or sampled == 0 or sampled < config.min_sampled:
        return Decision(
            False,
            f"not enough evidence: {sampled} sampled confident records in the gate split, "
            f"fewer than min_sampled={config.min_sampled} (raise cascade.audit_fraction or "
            "serve more traffic)",
        )
    groups = records.groups if records.groups is not None else np.arange(len(records))
    requests = len(np.unique(np.asarray(groups)[np.asarray(records.sampled, dtype=bool)]))
    if requests < config.min_requests:
        return Decision(
            False,
            f"not enough evidence: the {sampled} sampled confident records of the gate split "
            f"come from {requests} requests, fewer than min_requests={config.min_requests} "
            "(records of one request are resampled together; serve more traffic)",
        )
    boot = Bootstrap(
        records.weights, records.sampled, config.bootstrap_draws, config.seed, records.groups
    )
    level, target = config.confidence, config.target_agreement
    one_sided = 2 * level - 1  # each end of this two-sided interval is a one-sided bound
    needed = {}
    for side, judged in (("current", current), ("candidate", candidate)):
        needed[side] = needed_figure(boot, judged, target, one_sided)
    drop_draws = needed["current"][1] - needed["candidate"][1]
    drop = boot.summarise(
        needed["current"][0].value - needed["candidate"][0].value, drop_draws, one_sided
    )
    current_needs = needed["current"][0].value
    required = min(config.min_drop, config.min_relative_drop * current_needs)
    gain = None
    if current_needs <= 0:
        gain = boot.difference(candidate.agrees, current.agrees, one_sided)
        candidate_needs = needed["candidate"][0].value
    _, served_agrees = cascade_agrees(candidate)
    served = boot.estimate(served_agrees, one_sided)
    gold_change, gold_figures = _gold(current, candidate, teacher_gold_correct, config)

    def figures(side: str, judged: Judged, gold_figure: Estimate | None) -> StudentFigures:
        escalated, agrees = cascade_agrees(judged)
        return StudentFigures(
            judged.version,
            judged.threshold,
            needed[side][0],
            boot.estimate(escalated, level),
            boot.estimate(agrees, level),
            boot.estimate(np.asarray(judged.agrees, dtype=float), level),
            gold_figure,
        )

    failures = []
    if gain is not None:
        if gain.low <= 0:
            failures.append(
                f"the current student needs no escalation and the candidate's own agreement "
                f"gain {gain.value:+.1%} is not above 0 at {level:.0%} confidence (lower "
                f"bound {gain.low:+.1%})"
            )
        if candidate_needs > 0:
            failures.append(
                f"the current student needs no escalation and the candidate needs "
                f"{candidate_needs:.1%}"
            )
    elif drop.low <= required:
        failures.append(
            f"the escalation needed for {target:.1%} agreement drops by {drop.value:+.1%}, "
            f"not above {required:.1%} at {level:.0%} confidence (lower bound {drop.low:+.1%})"
        )
    floor = target - config.agreement_margin
    if served.high < floor:
        failures.append(
            f"at the threshold it would serve with ({candidate.threshold:.4g}) its cascade "
            f"agreement is below {floor:.1%} at {level:.0%} confidence ({served.value:.1%}, "
            f"upper bound {served.high:.1%})"
        )
    if gold_change is not None and gold_change.low < -config.gold_margin:
        failures.append(
            f"gold accuracy may be worse by more than {config.gold_margin:.1%} "
            f"(change {gold_change.value:+.1%}, lower bound {gold_change.low:+.1%})"
        )
    figure = (
        f"student agreement {gain.value:+.1%} [bound {gain.low:+.1%}]"
        if gain is not None
        else f"escalation needed {needed['current'][0].value:.1%} -> "
        f"{needed['candidate'][0].value:.1%}, drop {drop.value:+.1%} "
        f"[one-sided {level:.0%} bound {drop.low:+.1%}, required > {required:.1%}]"
    )
    summary = (
        f"{figure}, served agreement {served.value:.1%} [upper bound {served.high:.1%}], "
        f"{sampled} sampled of {len(records)} gate records"
        f" in {boot.n_groups} requests"
    )
    promote = not failures
    reason = (
        f"needs the teacher less at the target agreement ({summary})"
        if promote
        else "; ".join(failures) + f" ({summary})"
    )
    return Decision(
        promote,
        reason,
        figures("current", current, gold_figures[0]),
        figures("candidate", candidate, gold_figures[1]),
        drop,
        required,
        gain,
        served,
        gold_change,
    )


def _gold(
    current: Judged,
    candidate: Judged,
    teacher_gold_correct: np.ndarray | None,
    config: GateConfig,
) -> tuple[Estimate | None, list[Estimate | None]]:
    """Each student's cascade gold accuracy at its served threshold, and the change."""
    if teacher_gold_correct is None:
        return None, [None, None]
    right = []
    for judged in (current, candidate):
        if judged.gold_confidence is None or judged.gold_correct is None:
            raise ValueError(f"gold given but {judged.version} has no gold scores")
        escalated = should_escalate(judged.gold_confidence, judged.threshold)
        right.append(np.where(escalated, teacher_gold_correct, judged.gold_correct))
    ones = np.ones(len(teacher_gold_correct))
    boot = Bootstrap(ones, ones.astype(bool), config.bootstrap_draws, config.seed)
    one_sided = 2 * config.confidence - 1
    change = boot.difference(right[1], right[0], one_sided)
    return change, [boot.estimate(r, config.confidence) for r in right]
