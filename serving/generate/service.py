"""The generative cascade's request path, free of HTTP and of Ray: the student answers in
static batches, the decision, the teacher behind its bulkhead and deadline, the stream of
events, the log.

Streaming never lies: the first event (:class:`~serving.generate.events.Routed`) goes out
when the tier is final.

- **Kept**: the student generates its answer whole, the cascade decides, then the answer
  streams from the buffer.
- **Escalated**: the teacher is asked (with the student's draft when it can use it, see
  :func:`serving.generate.decision.draft_use`); ``Routed`` goes out with its first token.
  A teacher that fails (or passes ``teacher_timeout_s``, or the request's deadline)
  before its first token leaves the student's answer, marked degraded; after its first
  token the stream ends with :class:`~serving.generate.events.Failed`.
- **Bulkhead**: at most ``overload.teacher_max_in_flight`` escalated answers stream from
  the teacher at once; beyond it the student's answer goes out at once, degraded (logged
  with ``teacher_status: skipped``).
- **The log**: every escalated answer and every audited kept one (a uniform draw at
  ``audit_fraction``, made when the cascade decides) gets exactly one record, whatever
  becomes of the teacher or the request. The record is written by a task of its own,
  shielded, before the last event; a consumer that stops iterating (the client went away)
  still gets its record written once, from the generator's ``finally`` (teacher status
  ``cancelled`` when the teacher had not finished). Audits are answered by the teacher
  offline, as classification's offline audits are.

Consume the stream with ``contextlib.aclosing`` so that an abandoned stream is closed at
once (otherwise its record waits for the generator's garbage collection).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from serving.batcher import Batcher
from serving.contracts.generation_records import GenerationRecord
from serving.contracts.record_fields import Reason, TeacherStatus
from serving.generate.config import GenerateCascadeConfig
from serving.generate.decision import (
    Decision,
    DraftUse,
    TeacherAnswer,
    Tier,
    decide,
    draft_use,
    draw_audit,
    make_record,
)
from serving.generate.deltas import buffered_deltas, chunk_delta
from serving.generate.events import (
    Event,
    Failed,
    Finished,
    GenerationRequest,
    PromptTooLong,
    Routed,
    TextDelta,
    Usage,
)
from serving.generate.generation import Generated, SamplingSettings, TopLogprobs, generate_batch
from serving.generate.models import Message, render_chat, render_completion
from serving.generate.ports import GenerationMetrics, NoMetrics, Sink
from serving.generate.student import GenerativeStudent
from serving.generate.teacher_engine import (
    TeacherChunk,
    TeacherClient,
    TeacherDone,
    TeacherInfo,
    TeacherItem,
    TeacherRequest,
)
from serving.hot_swap import ActiveStudent

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
TEACHER_INFO_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class StudentRow:
    prompt_ids: Sequence[int]
    settings: SamplingSettings
    top_k: int = 0


@dataclass(frozen=True)
class StudentResult:
    answer: Generated
    active: ActiveStudent  # the version that answered (and so the threshold)
    settings: SamplingSettings  # as generated: max_new_tokens within that version's limit


@dataclass(eq=False)
class _Run:
    """One request as it goes: what its record and its last event need."""

    request: GenerationRequest
    settings: SamplingSettings
    answer: Generated
    student: GenerativeStudent
    decision: Decision
    threshold: float
    reason: Reason | None
    audited: bool
    began: float
    status: TeacherStatus = "skipped"
    draft: DraftUse = "not_asked"
    teacher_info: TeacherInfo | None = None
    teacher_ids: list[int] = field(default_factory=list)
    teacher_top: list[TopLogprobs] = field(default_factory=list)
    teacher_text: str = ""
    done: TeacherDone | None = None
    request_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    writing: asyncio.Task[bool] | None = None
    first_byte_s: float | None = None  # until Routed went out
    tier: Tier | None = None  # the tier Routed announced
    ended: bool = False  # counted as answered (or failed, or cancelled)

    @property
    def logged(self) -> bool:
        return self.decision.escalate or self.audited


class GenerationService:
    def __init__(
        self,
        config: GenerateCascadeConfig,
        active: Callable[[], ActiveStudent],
        teacher: TeacherClient,
        sink: Sink,
        metrics: GenerationMetrics | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        """``active`` returns the serving student (the slot's reference, read once per
        batch); its model is a :class:`~serving.generate.student.GenerativeStudent`."""
        self.config = config
        self._active = active
        self._teacher = teacher
        self.sink = sink
        self.metrics: GenerationMetrics = metrics or NoMetrics()
        self._draw = draw
        self.student_batcher: Batcher[StudentRow, StudentResult] = Batcher(
            self._student_batch,
            config.batching.max_batch_size,
            config.batching.batch_wait_timeout_s,
        )
        self.teacher_in_flight = 0
        self.teacher_failing_since: float | None = None
        self._teacher_info: TeacherInfo | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # --- before the request ---------------------------------------------------------------

    @property
    def student(self) -> GenerativeStudent:
        student: GenerativeStudent = self._active().model
        return student

    def prompt_ids(
        self, messages: Sequence[Message] | None = None, prompt: str | None = None
    ) -> list[int]:
        """A chat's ``messages`` (through the chat template) or a completion's ``prompt``
        in the serving student's tokens. :class:`PromptTooLong` beyond its
        ``max_prompt_tokens``; ValueError for a chat to a model without a chat template,
        an empty prompt, or not exactly one of the two."""
        if (messages is None) == (prompt is None):
            raise ValueError("give exactly one of messages (a chat) and prompt (a completion)")
        student = self.student
        tokenizer = student.lm.tokenizer
        if prompt is not None:
            ids = render_completion(tokenizer, prompt)
        else:
            assert messages is not None
            ids = render_chat(tokenizer, messages)
        if len(ids) > student.max_prompt_tokens:
            raise PromptTooLong(len(ids), student.max_prompt_tokens)
        return ids

    def max_new_tokens(self) -> int:
        """The serving version's most new tokens: a request's max_tokens is clamped to it."""
        return self.student.max_new_tokens

    def max_prompt_tokens(self) -> int:
        return self.student.max_prompt_tokens

    async def teacher_info(self) -> TeacherInfo:
        """The teacher's version and tokenizer digest (asked once, then kept)."""
        if self._teacher_info is None:
            self._teacher_info = await asyncio.wait_for(
                self._teacher.info(), TEACHER_INFO_TIMEOUT_S
            )
        return self._teacher_info

    def teacher_failing_for(self) -> float | None:
        """Seconds the teacher has failed every call; None when it works."""
        since = self.teacher_failing_since
        return None if since is None else time.monotonic() - since

    async def ask_teacher(self, texts: list[str]) -> tuple[list[TeacherDone] | None, str]:
        """One token from the teacher for each text, as a chat (every OpenAI-compatible
        server answers chats; some refuse legacy completions): the readiness probe's call,
        see :class:`serving.teacher_probe.TeacherProbe`. An answer clears a failing
        teacher, a failure is counted. Returns the answers' ends (None on failure) and the
        status."""
        done: list[TeacherDone] = []
        try:
            for text in texts:
                request = TeacherRequest(
                    settings=SamplingSettings(max_new_tokens=1),
                    messages=[{"role": "user", "content": text}],
                )
                async with aclosing(self._teacher.stream(request)) as items:
                    async for item in _within_timeout(items, self.config.teacher_timeout_s):
                        if isinstance(item, TeacherDone):
                            done.append(item)
        except Exception as exc:
            return None, self._failure(exc, by_deadline=False)
        self.teacher_failing_since = None
        return done, "answered"

    # --- the request ----------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Event, None]:
        """The events of one answer (see :mod:`serving.generate.events`)."""
        began = time.perf_counter()
        limit = self.student.max_prompt_tokens
        if len(request.prompt_ids) > limit:
            raise PromptTooLong(len(request.prompt_ids), limit)
        row = StudentRow(request.prompt_ids, request.settings, request.logprobs or 0)
        result = (await self.student_batcher.submit([row]))[0]
        answer, active, settings = result.answer, result.active, result.settings
        self.metrics.tokens("student", answer.completion_tokens)
        student: GenerativeStudent = active.model
        threshold = active.rule.value if request.threshold is None else request.threshold
        decision = decide(answer.logprobs, self.config.scorer, threshold, request.force_tier)
        # decided now, before any wait: logged whatever becomes of the request
        audited = draw_audit(decision, self.config.audit_fraction, self._draw)
        reason: Reason | None = None
        if decision.escalate:
            reason = "forced" if request.steered else decision.reason
        run = _Run(request, settings, answer, student, decision, threshold, reason, audited, began)
        if decision.escalate:
            run.status = "cancelled"  # what it stays if the consumer leaves while it waits
        try:
            if decision.escalate:
                events = self._escalated(run)
            else:
                events = self._student_answer(run, degraded=False)
            async with aclosing(events):
                async for event in events:
                    yield event
        finally:  # finished, failed, or abandoned: the record is written once
            if run.logged and run.writing is None:
                run.writing = self._start_write(run)
            tier = run.tier or ("teacher" if decision.escalate else "student")
            self._answered(run, tier, "cancelled")

    async def _student_batch(self, rows: list[StudentRow]) -> list[StudentResult]:
        active = self._active()  # read once: a swap during this batch does not split it
        student: GenerativeStudent = active.model
        self.metrics.observe("protege_batch_size", len(rows), model="generate_student")
        settings = [_clamped(row.settings, student.max_new_tokens) for row in rows]
        top_k = max(row.top_k for row in rows)
        answers = await asyncio.to_thread(
            generate_batch, student.lm, [row.prompt_ids for row in rows], settings, top_k
        )
        return [
            StudentResult(answer, active, s) for answer, s in zip(answers, settings, strict=True)
        ]

    # --- a kept answer, or the student's answer to an escalated one -----------------------

    async def _student_answer(self, run: _Run, degraded: bool) -> AsyncGenerator[Event, None]:
        yield self._routed(run, "student", degraded)
        for delta in buffered_deltas(run.answer, run.student.lm.tokenizer, run.request.logprobs):
            yield delta
        logged = await self._write(run)
        answer = run.answer
        outcome = "degraded" if degraded else "ok"
        self._answered(run, "student", outcome)
        usage = Usage(
            prompt_tokens=len(run.request.prompt_ids),
            completion_tokens=answer.completion_tokens,
            student_tokens=answer.completion_tokens,
        )
        yield Finished(answer.finish_reason, usage, logged=logged)

    # --- an escalated answer --------------------------------------------------------------

    async def _escalated(self, run: _Run) -> AsyncGenerator[Event, None]:
        if self.teacher_in_flight >= self.config.overload.teacher_max_in_flight:
            logger.warning("teacher bulkhead full: the student answers, degraded")
            run.status = "skipped"
            async with aclosing(self._student_answer(run, degraded=True)) as events:
                async for event in events:
                    yield event
            return
        self.teacher_in_flight += 1
        held = True  # this answer's place in the bulkhead
        stream: AsyncGenerator[TeacherItem, None] | None = None
        timeout, by_deadline = self._budget(run.request.deadline)
        try:
            try:
                if timeout <= 0:
                    raise TimeoutError("the request's deadline was spent before the teacher")
                waited = time.monotonic()
                run.teacher_info = info = await asyncio.wait_for(self.teacher_info(), timeout)
                stream = self._teacher.stream(self._teacher_request(run, info))
                timeout -= time.monotonic() - waited
                first: TeacherItem | None = await asyncio.wait_for(anext(stream), max(timeout, 0))
            except Exception as exc:  # never CancelledError: that is the consumer leaving
                run.status = self._failure(exc, by_deadline)
                run.draft = "not_asked"
                first = None
            if first is None:  # the student's answer stands; the teacher is done with
                if stream is not None:
                    await stream.aclose()
                    stream = None
                self.teacher_in_flight -= 1
                held = False
                async with aclosing(self._student_answer(run, degraded=True)) as events:
                    async for event in events:
                        yield event
                return
            yield self._routed(run, "teacher", False)
            assert stream is not None
            async with aclosing(self._teacher_answer(run, stream, first)) as events:
                async for event in events:
                    yield event
        finally:
            if held:
                self.teacher_in_flight -= 1
            if stream is not None:
                await stream.aclose()

    async def _teacher_answer(
        self, run: _Run, stream: AsyncGenerator[TeacherItem, None], item: TeacherItem
    ) -> AsyncGenerator[Event, None]:
        while not isinstance(item, TeacherDone):
            delta = self._teacher_delta(run, item)
            if delta is not None:
                yield delta
            timeout, by_deadline = self._budget(run.request.deadline)
            try:
                item = await asyncio.wait_for(anext(stream), max(timeout, 0.0))
            except Exception as exc:  # StopAsyncIteration too: a stream without its end
                run.status = self._failure(exc, by_deadline, broken=True)
                logged = await self._write(run)
                self._answered(run, "teacher", "failed")
                if run.status == "timeout":
                    yield Failed(
                        f"the teacher timed out mid-answer ({_describe(exc)})", "timeout", logged
                    )
                else:
                    yield Failed(
                        f"the teacher failed mid-answer ({_describe(exc)})", "failed", logged
                    )
                return
        run.done, run.status = item, "answered"
        self.teacher_failing_since = None
        self.metrics.tokens("teacher", item.completion_tokens - (item.accepted or 0))
        use = {"verified": "verified", "low_confidence": "skipped"}.get(run.draft, "none")
        checked = item.draft_tokens is not None and item.accepted is not None
        share = (item.accepted or 0) / item.draft_tokens if checked and item.draft_tokens else None
        self.metrics.draft(use, share, item.seconds_saved or 0.0)
        logged = await self._write(run)
        self._answered(run, "teacher", "ok")
        usage = Usage(
            prompt_tokens=len(run.request.prompt_ids),
            completion_tokens=item.completion_tokens,
            student_tokens=run.answer.completion_tokens,
            teacher_tokens=item.completion_tokens,
            teacher_prompt_tokens=item.prompt_tokens,
            draft_accepted=item.accepted if checked else None,
            draft_rejected=(item.draft_tokens or 0) - (item.accepted or 0) if checked else None,
            accepted_draft_share=share,
            teacher_seconds=item.seconds,
            teacher_seconds_saved=item.seconds_saved,
        )
        yield Finished(item.finish_reason, usage, logged=logged)

    def _teacher_request(self, run: _Run, info: TeacherInfo) -> TeacherRequest:
        run.draft = draft_use(
            reuse=self.config.draft_reuse,
            settings=run.settings,
            draft_tokens=run.answer.completion_tokens,
            student_digest=run.student.tokenizer_digest,
            teacher=info,
            confidence=run.decision.confidence,
            cut=run.student.draft_min_confidence,
        )
        request = run.request
        return TeacherRequest(
            settings=run.settings,
            prompt=request.prompt,
            messages=None if request.messages is None else [dict(m) for m in request.messages],
            prompt_ids=list(request.prompt_ids),
            ids_digest=run.student.tokenizer_digest,
            draft_ids=list(run.answer.token_ids) if run.draft == "verified" else None,
            top_k=self.config.top_logprobs,
            text_top_k=request.logprobs,
        )

    def _teacher_delta(self, run: _Run, chunk: TeacherChunk) -> TextDelta | None:
        run.teacher_ids += chunk.token_ids
        if chunk.top_logprobs is not None:
            run.teacher_top += chunk.top_logprobs
        run.teacher_text += chunk.text
        return chunk_delta(chunk, run.request.logprobs)

    def _budget(self, deadline: float | None) -> tuple[float, bool]:
        """(seconds the teacher may take for its next item, whether the deadline sets it)."""
        timeout = self.config.teacher_timeout_s
        if deadline is None:
            return timeout, False
        left = deadline - time.monotonic()
        return min(timeout, left), left < timeout

    def _failure(
        self, exc: BaseException, by_deadline: bool, broken: bool = False
    ) -> TeacherStatus:
        """Count a teacher failure; the record's teacher status for it."""
        timed_out = isinstance(exc, asyncio.TimeoutError | TimeoutError)
        if timed_out and by_deadline:  # the client's hurry, not the teacher's failure
            return "timeout"
        if self.teacher_failing_since is None:
            self.teacher_failing_since = time.monotonic()
        logger.warning("teacher failed%s: %s", " mid-answer" if broken else "", _describe(exc))
        return "timeout" if timed_out else "failed"

    # --- events and records ---------------------------------------------------------------

    def _answered(self, run: _Run, tier: Tier, outcome: str) -> None:
        """Count the request's end, once."""
        if run.ended:
            return
        run.ended = True
        reason = run.reason if run.decision.escalate else ("audit" if run.audited else None)
        self.metrics.answered(tier, outcome, run.first_byte_s, run.decision.confidence, reason)

    def _routed(self, run: _Run, tier: Tier, degraded: bool) -> Routed:
        run.first_byte_s, run.tier = time.perf_counter() - run.began, tier
        info = run.teacher_info or self._teacher_info
        requested = run.request.requested_max_tokens
        return Routed(
            tier=tier,
            escalated=run.decision.escalate,
            degraded=degraded,
            reason=run.reason,
            confidence=run.decision.confidence,
            threshold=run.threshold,
            student_version=run.student.version,
            teacher_version=None if info is None else info.version,
            draft=run.draft,
            draft_tokens=run.answer.completion_tokens,
            draft_accepted=None,
            max_new_tokens=run.settings.max_new_tokens,
            clamped=(requested or run.request.settings.max_new_tokens)
            > run.settings.max_new_tokens,
            prompt_tokens=len(run.request.prompt_ids),
        )

    async def _write(self, run: _Run) -> bool | None:
        """Start the request's one write (if it logs anything) and wait for it, shielded:
        a cancellation here leaves it to finish, once."""
        if not run.logged:
            return None
        if run.writing is None:
            run.writing = self._start_write(run)
        return await asyncio.shield(run.writing)

    def _start_write(self, run: _Run) -> asyncio.Task[bool]:
        return self._in_background(self._write_records([self._record(run)]))

    def _record(self, run: _Run) -> GenerationRecord:
        """The request's record; a top-k the record refuses (a remote server's malformed
        alternatives) is left out rather than losing the record."""
        try:
            return self._make_record(run, with_top_k=True)
        except ValueError as exc:
            logger.warning("teacher top-k left out of the record: %s", _describe(exc))
            return self._make_record(run, with_top_k=False)

    def _make_record(self, run: _Run, with_top_k: bool) -> GenerationRecord:
        request, done = run.request, run.done
        teacher = None
        if run.status == "answered" and done is not None:
            teacher = TeacherAnswer(
                text=run.teacher_text,
                version=done.version,
                token_ids=run.teacher_ids,
                top_logprobs=_named_top(run) if with_top_k else None,
                draft_tokens=done.draft_tokens,
                draft_accepted=done.accepted,
            )
        audit = not run.decision.escalate
        return make_record(
            request_id=request.request_id,
            request_key=run.request_key,
            prompt=request.prompt,
            messages=request.messages,
            student_text=run.answer.text,
            student_version=run.student.version,
            scorer=self.config.scorer,
            confidence=run.decision.confidence,
            threshold=run.threshold,
            settings=run.settings,
            reason="audit" if audit else (run.reason or "forced"),
            inclusion_probability=self.config.audit_fraction if audit else 1.0,
            teacher_status=run.status,
            teacher=teacher,
            top_k=self.config.top_logprobs,
        )

    async def _write_records(self, records: list[GenerationRecord]) -> bool:
        try:
            return await self.sink.write(records)
        except Exception:  # a task nobody may await: never an unretrieved exception
            logger.exception("generation log write failed for %d records", len(records))
            return False

    def _in_background(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task that outlives the request, held until done, in an empty context (Ray
        Serve cancels the calls a cancelled request made from its context)."""
        task = contextvars.Context().run(asyncio.create_task, work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


async def _within_timeout(
    items: AsyncGenerator[TeacherItem, None], timeout: float
) -> AsyncGenerator[TeacherItem, None]:
    """``items``, each within ``timeout`` seconds of the last (TimeoutError otherwise)."""
    while True:
        try:
            item = await asyncio.wait_for(anext(items), timeout)
        except StopAsyncIteration:
            return
        yield item


def _clamped(settings: SamplingSettings, limit: int) -> SamplingSettings:
    """``settings`` with ``max_new_tokens`` at most ``limit`` (a request clamped against
    one version may be generated by the next, after a swap)."""
    if settings.max_new_tokens <= limit:
        return settings
    return SamplingSettings(
        max_new_tokens=limit,
        temperature=settings.temperature,
        top_p=settings.top_p,
        stop=settings.stop,
        seed=settings.seed,
    )


def _named_top(run: _Run) -> list[TopLogprobs] | None:
    """The teacher's top-k as the log keeps it: cut to the most alternatives that every
    position names by distinct ids (a remote teacher names tokens by text, and a text its
    tokenizer cannot map, as partial UTF-8, has none; see ``remote_teacher``); None when
    an answer token itself is unnamed or nothing is left."""
    top, ids = run.teacher_top, run.teacher_ids
    if not top or len(top) != len(ids) or min(ids) < 0:
        return None
    k = min(_named_prefix(position) for position in top)
    return [position[:k] for position in top] if k else None


def _named_prefix(position: TopLogprobs) -> int:
    seen: set[int] = set()
    for i, _ in position:
        if i < 0 or i in seen:
            break
        seen.add(i)
    return len(seen)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__
