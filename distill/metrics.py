"""The distillation job's metrics, pushed to a Prometheus Pushgateway when one is configured.

The job is not a Serve replica, so it uses prometheus_client directly. Every figure is
also in the run report and the version's manifest; the push is for dashboards and alerts.
Run counts are read from the registry's run reports, so they are cumulative and survive
restarts even though each push replaces the job's previous group.

With offline audits (the default) the gateway never learns whether an audited input's
student agreed with the teacher; the job does, when it labels them. It pushes the last
measured agreement (``protege_distill_offline_audits``), which the recording rule
``protege:audit_agreement:ratio_1h`` falls back to and the dashboard shows.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Protocol

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from serving.contracts.records import EscalationRecord

logger = logging.getLogger(__name__)
JOB = "protege_distill"
RESULTS = (
    "promoted",
    "rejected",
    "recalibrated",  # nothing promoted; the current's weights republished with a new calibration
    "superseded",  # accepted, but the pointer moved during the run (a rollback): not promoted
    "lease-lost",  # another run took the lease over: nothing promoted or consumed
    "not-enough-evidence",
    "nothing-to-do",
    "failed",
)
COMPLETED = ("promoted", "rejected", "recalibrated", "superseded")


class Labeller(Protocol):
    """The teacher's answers for records (``distill.offline_labels.OfflineLabels``)."""

    labels: list[str]

    def probs(self, records: list[EscalationRecord]) -> np.ndarray: ...


def offline_audit_agreement(records: list[EscalationRecord], labeller: Labeller) -> dict[str, Any]:
    """Of ``records`` (the run's new ones), the audited inputs the teacher labelled offline:
    how many kept the teacher's label (the student's top label is the teacher's). Audits the
    teacher answered online are left out: the gateway counts those itself
    (``ray_protege_audits_total``)."""
    audits = [
        r
        for r in records
        if r.reason == "audit" and r.teacher_status != "answered" and r.labels == labeller.labels
    ]
    agree = 0
    if audits:
        teacher = labeller.probs(audits).argmax(axis=1)
        student = np.asarray([r.student_probs for r in audits]).argmax(axis=1)
        agree = int((teacher == student).sum())
    return {
        "audits": len(audits),
        "agree": agree,
        "disagree": len(audits) - agree,
        "ratio": agree / len(audits) if audits else None,
    }


def last_audit_agreement(reports: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The most recent run's offline audit agreement that rests on at least one audit."""
    measured = [
        r
        for r in reports
        if isinstance(r.get("audit_agreement"), dict) and r["audit_agreement"].get("audits")
    ]
    if not measured:
        return None
    latest = max(measured, key=lambda r: float(r.get("finished_at", 0.0)))
    return {**latest["audit_agreement"], "finished_at": float(latest.get("finished_at", 0.0))}


def run_counts(reports: list[dict[str, Any]]) -> Counter[str]:
    return Counter(str(r.get("result", "unknown")) for r in reports)


def last_success(reports: list[dict[str, Any]]) -> float | None:
    """When a run last completed (promoted, rejected or superseded)."""
    times = [
        float(r["finished_at"])
        for r in reports
        if r.get("result") in COMPLETED and "finished_at" in r
    ]
    return max(times, default=None)


def collect(report: dict[str, Any], reports: list[dict[str, Any]]) -> CollectorRegistry:
    """The job's gauges: ``report`` is this run's, ``reports`` every run's (this one too)."""
    registry = CollectorRegistry()
    runs = Gauge(
        "protege_distill_runs_total",
        "Distillation runs by result (from the run reports)",
        ["result"],
        registry=registry,
    )
    counts = run_counts(reports)
    for result in sorted(set(RESULTS) | set(counts)):
        runs.labels(result=result).set(counts.get(result, 0))
    Gauge(
        "protege_distill_last_run_timestamp_seconds", "When the last run ended", registry=registry
    ).set(time.time())
    Gauge(
        "protege_distill_last_run_duration_seconds", "How long the last run took", registry=registry
    ).set(float(report.get("seconds", 0.0)))
    success = last_success(reports)
    if success is not None:
        Gauge(
            "protege_distill_last_success_timestamp_seconds",
            "When a run last completed (promoted or rejected)",
            registry=registry,
        ).set(success)
    audits = last_audit_agreement(reports)
    if audits is not None:
        offline = Gauge(
            "protege_distill_offline_audits",
            "Audited inputs the last measuring run labelled offline (among its new records), "
            "by whether the student's label was the teacher's",
            ["agreement"],
            registry=registry,
        )
        offline.labels(agreement="agree").set(audits["agree"])
        offline.labels(agreement="disagree").set(audits["disagree"])
        Gauge(
            "protege_distill_offline_audits_timestamp_seconds",
            "When the run that measured protege_distill_offline_audits ended",
            registry=registry,
        ).set(audits["finished_at"])
    window = report.get("window", {})
    Gauge(
        "protege_distill_records_consumed",
        "New escalation records in the last run's window",
        registry=registry,
    ).set(float(window.get("new_records", 0)))
    losses = report.get("epoch_losses") or []
    if losses:
        Gauge(
            "protege_distill_final_loss", "Mean training loss of the last epoch", registry=registry
        ).set(float(losses[-1]))
    drop = report.get("decision", {}).get("escalation_drop")
    if drop:
        gate = Gauge(
            "protege_distill_gate",
            "The last gate's figure: the drop in escalation needed for the target agreement "
            "(current minus candidate; estimate, one-sided lower bound, the drop it had to "
            "exceed) and the sampled confident records it rested on",
            ["figure"],
            registry=registry,
        )
        gate.labels(figure="escalation_drop").set(float(drop["value"]))
        gate.labels(figure="escalation_drop_lower_bound").set(float(drop["low"]))
        required = report.get("decision", {}).get("required_drop")
        if required is not None:
            gate.labels(figure="required_drop").set(float(required))
        gate.labels(figure="sampled_records").set(float(drop["sampled"]))
        gate.labels(figure="records").set(float(drop["records"]))
    evals = report.get("eval", {})
    if evals:
        figures = Gauge(
            "protege_distill_eval",
            "Live-traffic estimates of the last run, current and candidate (ratios)",
            ["model", "figure"],
            registry=registry,
        )
        for model, values in evals.items():
            for figure, value in values.items():
                if isinstance(value, float):
                    figures.labels(model=model, figure=figure).set(value)
    return registry


def push(address: str | None, report: dict[str, Any], reports: list[dict[str, Any]]) -> bool:
    """Push when ``address`` is set; a Pushgateway that is down is a warning, never a failure.
    Each task kind's job is its own group (``kind`` label): a push replaces its whole group,
    so the classification and the generative jobs never wipe each other's metrics."""
    if not address:
        return False
    kind = str(report.get("kind", "classify"))
    try:
        push_to_gateway(
            address,
            job=JOB,
            registry=collect(report, reports),
            grouping_key={"kind": kind},
            timeout=5,
        )
    except OSError as exc:
        logger.warning("could not push distillation metrics to %s: %s", address, exc)
        return False
    return True
