"""The distillation job's metrics, pushed to a Prometheus Pushgateway when one is configured.

The job is not a Serve replica, so it uses prometheus_client directly. Every figure is
also in the run report and the version's manifest; the push is for dashboards and alerts.
Run counts are read from the registry's run reports, so they are cumulative and survive
restarts even though each push replaces the job's previous group.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

logger = logging.getLogger(__name__)
JOB = "protege_distill"
RESULTS = (
    "promoted",
    "rejected",
    "superseded",  # accepted, but the pointer moved during the run (a rollback): not promoted
    "lease-lost",  # another run took the lease over: nothing published
    "not-enough-evidence",
    "nothing-to-do",
    "failed",
)
COMPLETED = ("promoted", "rejected", "superseded")


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
            "The last gate's escalation drop (estimate and one-sided lower bound) and the "
            "sampled confident records it rested on",
            ["figure"],
            registry=registry,
        )
        gate.labels(figure="escalation_drop").set(float(drop["value"]))
        gate.labels(figure="escalation_drop_lower_bound").set(float(drop["low"]))
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
    """Push when ``address`` is set; a Pushgateway that is down is a warning, never a failure."""
    if not address:
        return False
    try:
        push_to_gateway(address, job=JOB, registry=collect(report, reports), timeout=5)
    except OSError as exc:
        logger.warning("could not push distillation metrics to %s: %s", address, exc)
        return False
    return True
