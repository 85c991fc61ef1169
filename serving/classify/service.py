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
- **Nothing lost to a cancellation**: the escalations and the audit draw are decided before
  the teacher is awaited, and the request's records are written once by a task of its own,
  started in a ``finally``: a request cancelled while it waits on the teacher (a client
  that went away, ``request_timeout_s``) still logs every escalated input (teacher status
  ``cancelled``, labelled offline) and its drawn audits; one cancelled during the write
  neither stops nor repeats it. An online audit of a cancelled request is still asked.
  Counted once: audits when drawn; a request's inputs and escalations when it is answered
  (a cancelled request is not counted as served, so the escalation rate stays a ratio of
  answered inputs).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, TypeVar

import numpy as np

from serving.classify.decision import Decision, decide, make_output, make_record
from serving.config import GatewayConfig
from serving.contracts.records import EscalationRecord, Reason, TeacherStatus
from serving.hot_swap import ActiveStudent
from serving.schemas import ClassifyOutput, Tier

logger = logging.getLogger("ray.serve")
T = TypeVar("T")

StudentRow = tuple[np.ndarray, bool, ActiveStudent]  # probabilities, truncated, who answered
StudentCall = Callable[[list[str]], Awaitable[list[StudentRow]]]  # one row per text
TeacherCall = Callable[[list[str], float], Awaitable[list[dict[str, Any]]]]  # texts, timeout
Outcome = tuple[dict[str, Any] | None, TeacherStatus]  # the teacher's answer or none, and why


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
    # the server's key for this request, on all its records (never the client's id)
    request_key: str = field(default_factory=lambda: uuid.uuid4().hex)

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
        self._background: set[asyncio.Task[Any]] = set()  # held: the loop keeps weak refs

    async def classify(self, texts: list[str], request_id: str, routing: Routing) -> Answer:
        began = time.perf_counter()
        batch = await self._ask_student(texts, request_id, routing.threshold)
        decision = decide(
            batch.probs, self.config.cascade.scorer, batch.thresholds, routing.force_tier
        )
        # decided now, before any wait: the inputs logged whatever becomes of the request
        escalated = np.flatnonzero(decision.escalate).tolist()
        audited = self._draw_audits(decision)
        reason: Reason | None = "forced" if routing.steered else decision.reason
        outcome: dict[int, Outcome] = {}  # per escalated input; filled before the first await
        try:
            await self._escalate(batch, escalated, routing.deadline, outcome)
        finally:  # answered, or cancelled while the teacher was awaited: logged once either way
            writing = self._log(batch, decision, reason or "forced", outcome, audited)
        answered = {i: answer for i, (answer, _) in outcome.items() if answer is not None}
        outputs = [
            self._teacher_output(answered[i], decision.confidence[i])
            if i in answered
            else self._student_output(batch, decision, i, i in outcome)
            for i in range(len(texts))
        ]
        # shielded: a cancellation here leaves the write to finish, once
        logged = await asyncio.shield(writing) if writing else None
        reasons: list[str | None] = [(reason if i in outcome else None) for i in range(len(texts))]
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
        self,
        batch: StudentAnswers,
        escalated: list[int],
        deadline: float | None,
        outcome: dict[int, Outcome],
    ) -> None:
        """Fill ``outcome`` for the escalated inputs: those beyond the bulkhead are skipped at
        once, the others are ``cancelled`` until the teacher's call returns (what they stay
        if the request is cancelled while it waits)."""
        room = max(0, self.config.overload.teacher_max_in_flight - self.teacher_in_flight)
        admitted, shed = escalated[:room], escalated[room:]
        outcome.update(dict.fromkeys(admitted, (None, "cancelled")))
        outcome.update(dict.fromkeys(shed, (None, "skipped")))
        if shed:
            self.metrics.inc("protege_teacher_shed", len(shed))
        if not admitted:
            return
        self.teacher_in_flight += len(admitted)
        try:
            texts = [batch.texts[i] for i in admitted]
            answers, status = await self.ask_teacher(texts, deadline)
        finally:
            self.teacher_in_flight -= len(admitted)
        for k, i in enumerate(admitted):
            outcome[i] = (answers[k] if answers else None, status)

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

    def teacher_failing_for(self) -> float | None:
        """Seconds the teacher has failed every call; None when it works. A read, never a
        call: readiness probes the teacher on a timer (``serving.teacher_probe``)."""
        since = self.teacher_failing_since
        return None if since is None else time.monotonic() - since

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

    def _log(
        self,
        batch: StudentAnswers,
        decision: Decision,
        reason: Reason,
        outcome: dict[int, Outcome],
        audited: list[int],
    ) -> asyncio.Task[bool] | None:
        """Start the one write of this request's records (its escalations as ``outcome``
        says, its offline or deferred audits; its online audits are asked apart), as a task
        of its own that a cancelled handler neither stops nor repeats."""
        records = [
            self._record(batch, decision, i, answer, reason, 1.0, status)
            for i, (answer, status) in outcome.items()
        ]
        records += self._start_audits(batch, decision, audited)
        if not records:
            return None
        return self._in_background(self._write(records))

    async def _write(self, records: list[EscalationRecord]) -> bool:
        try:
            return await self.sink.write(records)
        except Exception:  # a task nobody may await: never an unretrieved exception
            logger.exception("escalation log write failed for %d records", len(records))
            return False

    def _in_background(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task that outlives the request, held until done. It runs in an empty context:
        Ray Serve cancels the calls a cancelled request made from its context (its "child
        requests"), and a background teacher call must not be one of them."""
        task = contextvars.Context().run(asyncio.create_task, work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

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
            request_key=batch.request_key,
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

    def _draw_audits(self, decision: Decision) -> list[int]:
        """A uniform sample of the confident inputs, each with probability
        ``audit_fraction``, drawn when the cascade decides (so a request cancelled later
        still logs its audits)."""
        fraction = self.config.cascade.audit_fraction
        if fraction <= 0:
            return []
        chosen = [int(i) for i in np.flatnonzero(~decision.escalate) if self._draw() < fraction]
        if chosen:
            self.metrics.inc("protege_escalations", len(chosen), reason="audit")
        return chosen

    def _start_audits(
        self, batch: StudentAnswers, decision: Decision, chosen: list[int]
    ) -> list[EscalationRecord]:
        """Online audits go to the teacher off the response path (logged when it answers);
        the others are returned, to be logged with the request's records with the student's
        answer only (the job asks the teacher offline, in batch)."""
        if not chosen:
            return []
        if self.config.cascade.audit_teacher == "online":
            if self.audits_in_flight + len(chosen) <= self.config.overload.audits_max_in_flight:
                self.audits_in_flight += len(chosen)
                self._in_background(self._audit(batch, decision, chosen))
                return []
            # logged for offline labelling, never dropped: a dropped audit would make the
            # sample's inclusion probability false
            self.metrics.inc("protege_audits_deferred", len(chosen))
        return [self._audit_record(batch, decision, i, None, "skipped") for i in chosen]

    async def _audit(self, batch: StudentAnswers, decision: Decision, chosen: list[int]) -> None:
        try:
            answers, status = await self.ask_teacher([batch.texts[i] for i in chosen])
        finally:
            self.audits_in_flight -= len(chosen)
        by_index = dict(zip(chosen, answers, strict=True)) if answers else {}
        for i, answer in by_index.items():
            agree = int(np.argmax(answer["probs"])) == int(np.argmax(batch.probs[i]))
            self.metrics.inc("protege_audits", agreement="agree" if agree else "disagree")
        await self._write(
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
