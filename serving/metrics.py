"""Every metric the gateway exports: name, type, unit and labels, in one place.

Inside Ray Serve replicas metrics go through ``ray.serve.metrics`` (a prometheus_client
registry in a replica is not exported). Ray's metrics agent exports them on the node's
metrics port with a ``ray_`` prefix; counters gain ``_total``; Serve adds the
``application``, ``deployment`` and ``replica`` labels. So ``protege_inputs`` below is
scraped as ``ray_protege_inputs_total{tier,outcome,application,deployment,replica}``.
No label ever carries user text or request ids; model versions appear only on the
``protege_model_info`` gauge, whose series count is bounded by the versions served.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import cast

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
SWAP_BUCKETS_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
SHARE_BUCKETS = [0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0]  # Ray takes positive boundaries only


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # counter, gauge or histogram
    description: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


SPECS = [
    Spec(
        "protege_requests",
        "counter",
        "HTTP classify requests by the tier that answered "
        "(student, teacher or mixed) and outcome (ok, degraded, rejected)",
        ("tier", "outcome"),
    ),
    Spec(
        "protege_inputs",
        "counter",
        "Inputs answered, by tier and outcome (ok, degraded)",
        ("tier", "outcome"),
    ),
    Spec(
        "protege_escalations",
        "counter",
        "Inputs sent to the teacher, by reason (low_confidence, audit, forced)",
        ("reason",),
    ),
    Spec(
        "protege_teacher_failures",
        "counter",
        "Teacher calls that failed (error), timed out (timeout), or were cut short or not made "
        "by the request's deadline (deadline); their inputs are answered degraded",
        ("kind",),
    ),
    Spec(
        "protege_teacher_shed",
        "counter",
        "Escalated inputs answered by the student at once, degraded, because the teacher "
        "bulkhead was full (overload.teacher_max_in_flight)",
    ),
    Spec(
        "protege_audits_deferred",
        "counter",
        "Online audits logged for offline labelling instead, because "
        "overload.audits_max_in_flight were waiting on the teacher",
    ),
    Spec(
        "protege_confidence",
        "histogram",
        "The student's confidence per input (ratio)",
        buckets=tuple(CONFIDENCE_BUCKETS),
    ),
    Spec(
        "protege_request_latency_seconds",
        "histogram",
        "Whole classify request, by tier",
        ("tier",),
        tuple(LATENCY_BUCKETS_S),
    ),
    Spec(
        "protege_stage_latency_seconds",
        "histogram",
        "Time in one stage of a request "
        "(student: batching and forward pass; teacher: the escalation call)",
        ("stage",),
        tuple(LATENCY_BUCKETS_S),
    ),
    Spec(
        "protege_batch_size",
        "histogram",
        "Inputs per forward pass, by model",
        ("model",),
        tuple(float(b) for b in BATCH_BUCKETS),
    ),
    Spec("protege_threshold", "gauge", "The current escalation threshold (ratio)"),
    Spec(
        "protege_model_info",
        "gauge",
        "1 for the student and teacher versions now serving",
        ("student_version", "teacher_version"),
    ),
    Spec(
        "protege_student_eval",
        "gauge",
        "The serving student's evaluation figures from its version manifest (ratios)",
        ("figure",),
    ),
    Spec("protege_log_records", "counter", "Escalation-log records written"),
    Spec("protege_log_bytes", "counter", "Escalation-log bytes written"),
    Spec("protege_log_rotations", "counter", "Escalation-log segment rotations"),
    Spec("protege_log_write_errors", "counter", "Escalation-log writes that failed"),
    Spec("protege_log_segments_shipped", "counter", "Log segments shipped to shared storage"),
    Spec(
        "protege_log_ship_errors",
        "counter",
        "Log shipping passes that failed (retried with backoff; the segments stay on disk)",
    ),
    Spec(
        "protege_log_unshipped_bytes",
        "gauge",
        "Log bytes on this replica's disk not yet shipped (the open segment included)",
    ),
    Spec(
        "protege_versions_refused",
        "counter",
        "Downloaded registry versions refused: their files do not match their hashes",
    ),
    Spec(
        "protege_hot_swaps",
        "counter",
        "Student hot swaps by result (success, failure)",
        ("result",),
    ),
    Spec(
        "protege_hot_swap_duration_seconds",
        "histogram",
        "Load, validation and swap of a new student version",
        buckets=tuple(SWAP_BUCKETS_S),
    ),
    Spec(
        "protege_audits",
        "counter",
        "Audited inputs by whether student and teacher agreed",
        ("agreement",),
    ),
    # the generative cascade (OpenAI-compatible chat and completions)
    Spec(
        "protege_generate_requests",
        "counter",
        "Chat and completion requests by the tier that answered (student, teacher) and "
        "outcome (ok; degraded: the teacher failed before its first token; failed: after it; "
        "cancelled: the client went away)",
        ("tier", "outcome"),
    ),
    Spec(
        "protege_generate_tokens",
        "counter",
        "Tokens generated, by the model that generated them (student, teacher); a teacher's "
        "accepted draft tokens are the student's",
        ("model",),
    ),
    Spec(
        "protege_generate_escalations",
        "counter",
        "Generation requests sent to the teacher, by reason (low_confidence, audit, forced)",
        ("reason",),
    ),
    Spec(
        "protege_generate_confidence",
        "histogram",
        "The student's confidence per generated answer (ratio)",
        buckets=tuple(CONFIDENCE_BUCKETS),
    ),
    Spec(
        "protege_generate_first_byte_seconds",
        "histogram",
        "From the request to its first byte (the tier is final then), by tier",
        ("tier",),
        tuple(LATENCY_BUCKETS_S),
    ),
    Spec(
        "protege_generate_draft_accepted_share",
        "histogram",
        "Share of the student's draft the teacher kept, per verified draft (ratio)",
        buckets=tuple(SHARE_BUCKETS),
    ),
    Spec(
        "protege_generate_drafts",
        "counter",
        "Escalated answers by what the teacher did with the student's draft (verified; "
        "skipped: the skip rule said it was mostly wrong; none: sampling, other tokenizers, "
        "a remote teacher)",
        ("use",),
    ),
    Spec(
        "protege_generate_teacher_seconds_saved",
        "counter",
        "Teacher decoding time saved by accepted draft tokens (estimated from the teacher's "
        "measured seconds per token); savings only: a rejected draft's small extra cost is "
        "not subtracted, so read it as an upper bound",
    ),
]


class Metrics:
    """The metrics of one replica, created from :data:`SPECS` (call inside the replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._m: dict[str, object] = {}
        for spec in SPECS:
            tags = cast("tuple[str]", spec.tags)  # Ray annotates tag_keys as a 1-tuple
            if spec.kind == "counter":
                self._m[spec.name] = metrics.Counter(spec.name, spec.description, tags)
            elif spec.kind == "gauge":
                self._m[spec.name] = metrics.Gauge(spec.name, spec.description, tags)
            else:
                self._m[spec.name] = metrics.Histogram(
                    spec.name, spec.description, list(spec.buckets), tags
                )

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._m[name].inc(value, tags=tags or None)  # type: ignore[attr-defined]

    def set(self, name: str, value: float, **tags: str) -> None:
        self._m[name].set(value, tags=tags or None)  # type: ignore[attr-defined]

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._m[name].observe(value, tags=tags or None)  # type: ignore[attr-defined]


class GatewayMetrics(Metrics):
    """What the Gateway records, one call per event (names from :data:`SPECS`)."""

    def request(
        self,
        tiers: list[str],
        degraded: list[bool],
        confidences: list[float],
        reasons: list[str | None],
        seconds: float,
    ) -> None:
        tier = tiers[0] if len(set(tiers)) == 1 else "mixed"
        self.inc("protege_requests", tier=tier, outcome="degraded" if any(degraded) else "ok")
        self.observe("protege_request_latency_seconds", seconds, tier=tier)
        # one counter update per distinct tag set, not per input (a histogram has no
        # bulk observe, so confidences are the one per-input call)
        outcomes = Counter(
            (t, "degraded" if bad else "ok") for t, bad in zip(tiers, degraded, strict=True)
        )
        for (t, outcome), count in outcomes.items():
            self.inc("protege_inputs", count, tier=t, outcome=outcome)
        for reason, count in Counter(r for r in reasons if r).items():
            self.inc("protege_escalations", count, reason=reason)
        for confidence in confidences:
            self.observe("protege_confidence", confidence)

    def rejected(self) -> None:
        self.inc("protege_requests", tier="none", outcome="rejected")

    def log_written(self, records: int, size: int, rotations: int) -> None:
        self.inc("protege_log_records", records)
        self.inc("protege_log_bytes", size)
        self.inc("protege_log_rotations", rotations)

    def serving(
        self,
        student_version: str,
        teacher_version: str,
        threshold: float,
        figures: dict[str, float],
        previous: tuple[str, str] | None = None,
    ) -> None:
        """The versions (and their threshold and eval figures) now serving."""
        if previous and previous != (student_version, teacher_version):
            self.set(
                "protege_model_info", 0, student_version=previous[0], teacher_version=previous[1]
            )
        self.set(
            "protege_model_info",
            1,
            student_version=student_version,
            teacher_version=teacher_version,
        )
        self.set("protege_threshold", threshold)
        for figure, value in figures.items():
            self.set("protege_student_eval", value, figure=figure)


class GenerationMetrics(Metrics):
    """What the generative cascade records, one call per event (names from :data:`SPECS`)."""

    def answered(
        self,
        tier: str,
        outcome: str,
        first_byte_s: float | None,
        confidence: float,
        reason: str | None,
    ) -> None:
        self.inc("protege_generate_requests", tier=tier, outcome=outcome)
        if first_byte_s is not None:
            self.observe("protege_generate_first_byte_seconds", first_byte_s, tier=tier)
        if confidence == confidence:  # a NaN confidence is escalated, not observed
            self.observe("protege_generate_confidence", confidence)
        if reason:
            self.inc("protege_generate_escalations", reason=reason)

    def tokens(self, model: str, count: int) -> None:
        self.inc("protege_generate_tokens", count, model=model)

    def draft(self, use: str, accepted_share: float | None, seconds_saved: float) -> None:
        self.inc("protege_generate_drafts", use=use)
        if accepted_share is not None:
            self.observe("protege_generate_draft_accepted_share", accepted_share)
        self.inc("protege_generate_teacher_seconds_saved", seconds_saved)


class ReplicaMetrics(GatewayMetrics, GenerationMetrics):
    """Every cascade's metrics in one gateway replica, on one set of Ray metric objects
    (a replica hosting both kinds creates each metric once)."""
