"""The cascade's orchestration, free of HTTP and of Ray: the student answers, the decision,
the teacher call behind its bulkhead and deadline, the records, the audits.

The ingress replica hands it two calls (the batched student, the teacher) and a log sink;
a unit test hands it plain functions.

- **Bulkhead**: at most ``overload.teacher_max_in_flight`` escalated inputs wait on the
  teacher at once; an escalated input beyond that gets the student's answer at once,
  marked degraded (and is logged with ``teacher_status: skipped``, labelled offline), so a
  slow teacher never takes the student path's latency with it.
- **Deadline**: a request's deadline caps the wait for the teacher; when it is spent the
  student's answer is returned, marked degraded.
- **Audits**: offline audits are records returned with the request's own; online audits
  ask the teacher off the response path, at most ``overload.audits_max_in_flight`` inputs
  at once (beyond that they are logged like offline audits and counted as deferred: an
  audit is never dropped, or the sample's inclusion probability would be false).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from serving.cascade import Decision, decide, make_output, make_record
from serving.config import GatewayConfig
from serving.escalation_log import EscalationRecord, Reason, TeacherStatus
from serving.hot_swap import ActiveStudent
from serving.schemas import ClassifyOutput, Tier

logger = logging.getLogger("ray.serve")

StudentRow = tuple[np.ndarray, bool, ActiveStudent]  # probabilities, truncated, who answered
StudentCall = Callable[[list[str]], Awaitable[list[StudentRow]]]  # one row per text
TeacherCall = Callable[[list[str], float], Awaitable[list[dict[str, Any]]]]  # texts, timeout


class Sink(Protocol):
    async def write(self, records: list[EscalationRecord]) -> bool: ...


class ServiceMetrics(Protocol):
    def inc(self, name: str, value: float = 1.0, **tags: str) -> None: ...

    def observe(self, name: str, value: float, **tags: str) -> None: ...

    def request(
        self,
        tiers: list[str],
        degraded: list[bool],
        confidences: list[float],
        reasons: list[str | None],
        seconds: float,
    ) -> None: ...


@dataclass(frozen=True)
class Routing:
    """What the client asked for besides its texts."""

    threshold: float | None = None
    force_tier: Tier | None = None
    deadline: float | None = None  # time.monotonic() by which the answer is due

    @property
    def steered(self) -> bool:
        """The client chose the routing: its escalations are logged and counted as forced."""
        return self.force_tier == "teacher" or self.threshold is not None


@dataclass
class Answer:
    outputs: list[ClassifyOutput]
    logged: bool | None  # None: nothing to log; False: the log write failed


@dataclass
class StudentAnswers:
    """The student's side of one request: per input, its probabilities and the version (and
    so the threshold) that produced them; a swap may land between two inputs' batches."""

    request_id: str
    texts: list[str]
    probs: np.ndarray
    truncated: list[bool]
    students: list[ActiveStudent]
    override: float | None

    @cached_property
    def thresholds(self) -> np.ndarray:
        if self.override is not None:
            return np.full(len(self.texts), self.override)
        return np.array([s.rule.value for s in self.students])


class CascadeService:
    def __init__(
        self,
        config: GatewayConfig,
        labels: list[str],
        student: StudentCall,
        teacher: TeacherCall,
        sink: Sink,
        metrics: ServiceMetrics,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.labels = labels
        self._student = student
        self._teacher = teacher
        self.sink = sink
        self.metrics = metrics
        self._draw = draw
        self.teacher_in_flight = 0  # escalated inputs waiting on the teacher
        self.audits_in_flight = 0
        self.teacher_failing_since: float | None = None  # monotonic time of the first failure
        self._background: set[asyncio.Task[None]] = set()

    async def classify(self, texts: list[str], request_id: str, routing: Routing) -> Answer:
        began = time.perf_counter()
        batch = await self._ask_student(texts, request_id, routing.threshold)
        decision = decide(
            batch.probs, self.config.cascade.scorer, batch.thresholds, routing.force_tier
        )
        escalated = np.flatnonzero(decision.escalate).tolist()
        answers, statuses = await self._escalate([texts[i] for i in escalated], routing.deadline)
        by_input = dict(zip(escalated, answers, strict=True))
        status_of = dict(zip(escalated, statuses, strict=True))
        outputs = [
            self._teacher_output(answer, decision.confidence[i])
            if (answer := by_input.get(i)) is not None
            else self._student_output(batch, decision, i, i in status_of)
            for i in range(len(texts))
        ]
        reason: Reason | None = "forced" if routing.steered else decision.reason
        # logged even when the teacher failed or was not asked: the job labels those offline
        records = [
            self._record(batch, decision, i, by_input[i], reason or "forced", 1.0, status_of[i])
            for i in escalated
        ]
        records += self._maybe_audit(batch, decision)
        logged = await self.sink.write(records) if records else None
        reasons: list[str | None] = [
            (reason if i in status_of else None) for i in range(len(texts))
        ]
        self.metrics.request(
            [o.tier for o in outputs],
            [o.degraded for o in outputs],
            [o.confidence for o in outputs],
            reasons,
            time.perf_counter() - began,
        )
        return Answer(outputs, logged)

    async def _ask_student(
        self, texts: list[str], request_id: str, threshold: float | None
    ) -> StudentAnswers:
        began = time.perf_counter()
        rows = await self._student(texts)
        self.metrics.observe(
            "protege_stage_latency_seconds", time.perf_counter() - began, stage="student"
        )
        return StudentAnswers(
            request_id=request_id,
            texts=texts,
            probs=np.stack([r[0] for r in rows]),
            truncated=[r[1] for r in rows],
            students=[r[2] for r in rows],
            override=threshold,
        )

    # --- the teacher ----------------------------------------------------------------------

    async def _escalate(
        self, texts: list[str], deadline: float | None
    ) -> tuple[list[dict[str, Any] | None], list[TeacherStatus]]:
        """The teacher's answer per input (None where it has none) and the status of each:
        inputs beyond the bulkhead are skipped at once, the others asked together."""
        if not texts:
            return [], []
        room = max(0, self.config.overload.teacher_max_in_flight - self.teacher_in_flight)
        admitted, shed = texts[:room], len(texts) - min(room, len(texts))
        if shed:
            self.metrics.inc("protege_teacher_shed", shed)
        answers: list[dict[str, Any]] | None = None
        status: TeacherStatus = "skipped"
        if admitted:
            self.teacher_in_flight += len(admitted)
            try:
                answers, status = await self.ask_teacher(admitted, deadline)
            finally:
                self.teacher_in_flight -= len(admitted)
        got: list[dict[str, Any] | None] = list(answers) if answers else [None] * len(admitted)
        statuses: list[TeacherStatus] = [status] * len(admitted) + ["skipped"] * shed
        return got + [None] * shed, statuses

    async def ask_teacher(
        self, texts: list[str], deadline: float | None = None
    ) -> tuple[list[dict[str, Any]] | None, TeacherStatus]:
        """The teacher's answers, or None and why when it fails or times out."""
        timeout = self.config.teacher_timeout_s
        by_deadline = deadline is not None and deadline - time.monotonic() < timeout
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
        if timeout <= 0:
            self.metrics.inc("protege_teacher_failures", kind="deadline")
            return None, "timeout"
        began = time.perf_counter()
        try:
            answers = await self._teacher(texts, timeout)
        except Exception as exc:  # timeout, dead replica, model error: the student answers
            timed_out = isinstance(exc, asyncio.TimeoutError | TimeoutError)
            if timed_out and by_deadline:  # the client's hurry, not the teacher's failure
                self.metrics.inc("protege_teacher_failures", kind="deadline")
                return None, "timeout"
            self.metrics.inc("protege_teacher_failures", kind="timeout" if timed_out else "error")
            if self.teacher_failing_since is None:
                self.teacher_failing_since = time.monotonic()
            logger.warning("teacher failed for %d inputs: %r", len(texts), exc)
            return None, "timeout" if timed_out else "failed"
        self.metrics.observe(
            "protege_stage_latency_seconds", time.perf_counter() - began, stage="teacher"
        )
        self.teacher_failing_since = None
        return answers, "answered"

    async def teacher_failing_for(self) -> float | None:
        """Seconds the teacher has failed every call, after one probe; None when it works."""
        if self.teacher_failing_since is None:
            return None
        answers, _ = await self.ask_teacher(["readiness probe"])
        since = self.teacher_failing_since
        return None if answers is not None or since is None else time.monotonic() - since

    # --- outputs and records --------------------------------------------------------------

    def _teacher_output(self, answer: dict[str, Any], confidence: float) -> ClassifyOutput:
        return make_output(
            np.asarray(answer["probs"]),
            self.labels,
            confidence=confidence,
            tier="teacher",
            version=answer["version"],
            escalated=True,
            truncated=answer["truncated"],
        )

    def _student_output(
        self, batch: StudentAnswers, decision: Decision, i: int, degraded: bool
    ) -> ClassifyOutput:
        return make_output(
            batch.probs[i],
            self.labels,
            confidence=decision.confidence[i],
            tier="student",
            version=batch.students[i].version,
            escalated=bool(decision.escalate[i]),
            degraded=degraded,
            truncated=batch.truncated[i],
        )

    def _record(
        self,
        batch: StudentAnswers,
        decision: Decision,
        i: int,
        answer: dict[str, Any] | None,
        reason: Reason,
        inclusion_probability: float,
        status: TeacherStatus,
    ) -> EscalationRecord:
        return make_record(
            request_id=batch.request_id,
            text=batch.texts[i],
            reason=reason,
            inclusion_probability=inclusion_probability,
            labels=self.labels,
            student_version=batch.students[i].version,
            student_probs=batch.probs[i],
            scorer=self.config.cascade.scorer,
            confidence=decision.confidence[i],
            threshold=float(batch.thresholds[i]),
            teacher=answer,
            teacher_status=status,
        )

    # --- audits ---------------------------------------------------------------------------

    def _maybe_audit(self, batch: StudentAnswers, decision: Decision) -> list[EscalationRecord]:
        """Log a uniform sample of the confident inputs, each with probability
        ``audit_fraction``: with the student's answer only (returned, for the job to ask the
        teacher offline, in batch), or with the teacher's, asked off the response path."""
        cascade = self.config.cascade
        if cascade.audit_fraction <= 0:
            return []
        chosen = [
            int(i)
            for i in np.flatnonzero(~decision.escalate)
            if self._draw() < cascade.audit_fraction
        ]
        if not chosen:
            return []
        self.metrics.inc("protege_escalations", len(chosen), reason="audit")
        if cascade.audit_teacher == "offline":
            return [self._audit_record(batch, decision, i, None, "skipped") for i in chosen]
        if self.audits_in_flight + len(chosen) > self.config.overload.audits_max_in_flight:
            # logged for offline labelling, never dropped: a dropped audit would make the
            # sample's inclusion probability false
            self.metrics.inc("protege_audits_deferred", len(chosen))
            return [self._audit_record(batch, decision, i, None, "skipped") for i in chosen]
        self.audits_in_flight += len(chosen)
        task = asyncio.create_task(self._audit(batch, decision, chosen))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return []

    async def _audit(self, batch: StudentAnswers, decision: Decision, chosen: list[int]) -> None:
        try:
            answers, status = await self.ask_teacher([batch.texts[i] for i in chosen])
        finally:
            self.audits_in_flight -= len(chosen)
        by_index = dict(zip(chosen, answers, strict=True)) if answers else {}
        for i, answer in by_index.items():
            agree = int(np.argmax(answer["probs"])) == int(np.argmax(batch.probs[i]))
            self.metrics.inc("protege_audits", agreement="agree" if agree else "disagree")
        await self.sink.write(
            [self._audit_record(batch, decision, i, by_index.get(i), status) for i in chosen]
        )

    def _audit_record(
        self,
        batch: StudentAnswers,
        decision: Decision,
        i: int,
        answer: dict[str, Any] | None,
        status: TeacherStatus,
    ) -> EscalationRecord:
        fraction = self.config.cascade.audit_fraction
        return self._record(batch, decision, i, answer, "audit", fraction, status)
