"""The teacher's side of an escalated generation, free of Ray: what is asked, what streams
back, and the engine that answers over a local language model.

:class:`TeacherClient` is the seam the generation service calls. Its implementations are
:class:`LocalTeacher` (this engine, in process: the unit tests, a single-process server)
and :class:`serving.generate.teacher.HandleTeacher` (the teacher deployment, streaming
through a Ray Serve handle); a remote OpenAI-compatible teacher fits the same protocol.

The engine batches concurrent calls with :class:`serving.batcher.Batcher` (a batch forms
when the model is free) and runs each static batch to its end in a worker thread:

- greedy rows go through :func:`serving.generate.draft.verify_drafts_stream`: one batched
  pass over prompt + draft keeps the longest prefix the teacher agrees with, then the rest
  is generated (a row without a draft is plain greedy generation, in the same batch);
- sampled rows go through :func:`serving.generate.generation.generate_stream` (a draft
  means nothing to a sampled answer), interleaved step by step with the greedy ones.

A draft is used only when the prompt's ids were written with this teacher's tokenizer
(``ids_digest`` equal to :func:`tokenizer_digest` of its own); otherwise the teacher
renders the prompt itself and ignores the draft. Each call streams :class:`TeacherChunk`
items (text and per-token log-probabilities with the top-k) and ends with one
:class:`TeacherDone` (accepted draft count, forward passes, finish reason), or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from transformers import PreTrainedTokenizerBase

from serving.batcher import Batcher
from serving.generate.draft import Verified, verify_drafts_stream
from serving.generate.generation import (
    Delta,
    FinishReason,
    Generated,
    SamplingSettings,
    TopLogprobs,
    generate_stream,
)
from serving.generate.models import LanguageModel, Message, render_chat, render_completion

logger = logging.getLogger("ray.serve")
STEP_SECONDS_WEIGHT = 0.2  # weight of a new batch's figure in the running mean step time


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short digest of what :func:`serving.generate.models.same_tokenizer` compares
    (vocabulary with added tokens, special tokens and ids, chat template): two processes
    share a tokenizer, so ids and drafts, when their digests are equal."""
    identity = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": list(tokenizer.all_special_tokens),
        "special_ids": [int(i) for i in tokenizer.all_special_ids],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TeacherInfo:
    version: str
    tokenizer_digest: str | None  # None: ids and drafts cannot be shared (a remote API)
    verifies_drafts: bool = True


@dataclass(frozen=True)
class TeacherRequest:
    """One escalated answer to write.

    ``prompt`` or ``messages`` is the prompt as text (the teacher renders it when it cannot
    use ``prompt_ids``); ``prompt_ids`` are the same prompt in the tokens of the tokenizer
    whose digest is ``ids_digest``; ``draft_ids`` the student's answer in those tokens
    (None: generate from scratch). ``top_k`` alternatives are returned per token (ids, for
    the log); ``text_top_k`` asks for the tokens' text too, with that many alternatives
    (None: no token text, for a client that asked no log-probabilities).
    """

    settings: SamplingSettings
    prompt: str | None = None
    messages: Sequence[Message] | None = None
    prompt_ids: Sequence[int] | None = None
    ids_digest: str | None = None
    draft_ids: Sequence[int] | None = None
    top_k: int = 0
    text_top_k: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("a teacher request holds exactly one of prompt and messages")
        if self.top_k < 0 or (self.text_top_k is not None and self.text_top_k < 0):
            raise ValueError("top_k and text_top_k must be >= 0")


@dataclass(frozen=True)
class TeacherChunk:
    """What one step added to the answer: its text and tokens (the texts of all chunks
    make the answer). ``top_logprobs[i]`` holds ``(id, log-probability)`` pairs, most
    likely first; ``tokens`` and ``top_tokens`` the tokens' text, when asked for."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs] | None = None
    tokens: list[str] | None = None
    top_tokens: list[list[str]] | None = None


@dataclass(frozen=True)
class TeacherDone:
    """The end of an answer. ``draft_tokens`` / ``accepted`` are None when no draft was
    checked. ``seconds_saved`` estimates the teacher time the draft saved: the forward
    passes it spared at the engine's mean decode-step time, less the verification pass's
    reading of the draft at its mean prefill time per position (negative for a rejected
    draft; None until both times were measured)."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    version: str
    draft_tokens: int | None = None
    accepted: int | None = None
    forward_passes: int | None = None
    forward_passes_without_draft: int | None = None
    seconds: float = 0.0
    seconds_saved: float | None = None


TeacherItem = TeacherChunk | TeacherDone


class TeacherClient(Protocol):
    """The seam between the generation service and a teacher, wherever it runs."""

    async def info(self) -> TeacherInfo: ...

    def stream(self, request: TeacherRequest) -> AsyncGenerator[TeacherItem, None]:
        """Chunks, then one :class:`TeacherDone`; raises when the teacher fails. Closing
        the generator early cancels the teacher's work for it."""
        ...


@dataclass(eq=False)
class _Job:
    request: TeacherRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TeacherItem | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the caller went away
    ended: bool = False  # a TeacherDone or an error was pushed
    prompt: list[int] = field(default_factory=list)
    draft: list[int] | None = None

    def push(self, item: TeacherItem | BaseException) -> None:
        """From the worker thread: hand ``item`` to the caller's loop."""
        if self.ended:
            return
        self.ended = isinstance(item, TeacherDone | BaseException)
        with contextlib.suppress(RuntimeError):  # the caller's loop is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class TeacherEngine:
    """A local teacher model answering streamed, batched requests."""

    def __init__(
        self, lm: LanguageModel, version: str, max_batch_size: int = 8, wait_s: float = 0.01
    ) -> None:
        self.lm = lm
        self.version = version
        self.digest = tokenizer_digest(lm.tokenizer)
        self.window = getattr(lm.model.config, "max_position_embeddings", None)
        self.vocab = int(lm.model.get_output_embeddings().weight.shape[0])
        self.step_seconds: float | None = None  # running mean of one decode step
        self.prefill_token_seconds: float | None = None  # of one position in a prefill pass
        self._lock = threading.Lock()  # one batch on the model at a time
        self.batcher: Batcher[_Job, None] = Batcher(self._run, max_batch_size, wait_s)
        self.batch_sizes: list[int] = []  # for metrics and tests; bounded below
        self._pending: set[asyncio.Task[Any]] = set()

    def info(self) -> TeacherInfo:
        return TeacherInfo(self.version, self.digest, verifies_drafts=True)

    async def stream(self, request: TeacherRequest) -> AsyncGenerator[TeacherItem, None]:
        job = _Job(request, asyncio.get_running_loop())
        submitted = asyncio.ensure_future(self.batcher.submit([job]))
        self._pending.add(submitted)
        submitted.add_done_callback(self._submitted)
        submitted.add_done_callback(lambda task: self._failed(task, job))
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, TeacherDone):
                    return
        finally:
            job.cancelled = True
            if not submitted.done():
                submitted.cancel()  # not started yet: the batcher skips it

    def _submitted(self, task: asyncio.Task[Any]) -> None:
        self._pending.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the job's queue carries it (see _failed)

    @staticmethod
    def _failed(task: asyncio.Task[Any], job: _Job) -> None:
        if task.cancelled() or job.ended:
            return
        error = task.exception()
        job.push(error or RuntimeError("the teacher's batch ended without an answer"))

    async def _run(self, jobs: list[_Job]) -> list[None]:
        self.batch_sizes = [*self.batch_sizes[-999:], len(jobs)]
        await asyncio.to_thread(self._generate, jobs)
        return [None] * len(jobs)

    # --- the worker thread ----------------------------------------------------------------

    def _generate(self, jobs: list[_Job]) -> None:
        with self._lock:
            began = time.perf_counter()
            ready = [job for job in jobs if not job.cancelled and self._prepare(job)]
            try:
                self._steps(ready, began)
            except Exception as exc:  # every unfinished caller of the batch gets the error
                logger.exception("teacher batch of %d failed", len(ready))
                for job in ready:
                    job.push(exc)
            for job in ready:  # never a caller left waiting
                job.push(RuntimeError("the teacher's batch ended without an answer"))

    def _prepare(self, job: _Job) -> bool:
        """The prompt in this teacher's tokens, and the draft if it may be used."""
        request = job.request
        try:
            if request.prompt_ids is not None and request.ids_digest == self.digest:
                job.prompt = [int(i) for i in request.prompt_ids]
                if request.draft_ids is not None and request.settings.greedy:
                    job.draft = [int(i) for i in request.draft_ids]
            elif request.messages is not None:
                job.prompt = render_chat(self.lm.tokenizer, request.messages)
            else:
                job.prompt = render_completion(self.lm.tokenizer, request.prompt or "")
            if any(not 0 <= t < self.vocab for t in job.prompt):
                raise ValueError(f"a prompt token id lies outside the vocabulary ({self.vocab})")
            if job.draft is not None and any(not 0 <= t < self.vocab for t in job.draft):
                job.draft = None  # ids of another model: plain generation (one row's loss)
            need = len(job.prompt) + request.settings.max_new_tokens
            if self.window is not None and need > self.window:
                raise ValueError(
                    f"prompt of {len(job.prompt)} tokens plus {request.settings.max_new_tokens}"
                    f" new ones exceeds the teacher's window of {self.window} positions"
                )
        except Exception as exc:
            job.push(exc)
            return False
        return True

    def _steps(self, jobs: list[_Job], began: float) -> None:
        greedy = [job for job in jobs if job.request.settings.greedy]
        sampled = [job for job in jobs if not job.request.settings.greedy]
        k = max((max(j.request.top_k, j.request.text_top_k or 0) for j in jobs), default=0)
        streams: list[tuple[list[_Job], Iterator[list[Delta]]]] = []
        if greedy:
            steps = verify_drafts_stream(
                self.lm,
                [j.prompt for j in greedy],
                [j.draft or [] for j in greedy],
                [j.request.settings.max_new_tokens for j in greedy],
                top_k=k,
                stop=[list(j.request.settings.stop) for j in greedy],
            )
            streams.append((greedy, steps))
        if sampled:
            settings = [j.request.settings for j in sampled]
            steps = generate_stream(self.lm, [j.prompt for j in sampled], settings, top_k=k)
            streams.append((sampled, steps))
        started: set[int] = set()
        while streams:
            for entry in list(streams):
                group, steps = entry
                if all(j.cancelled or j.ended for j in group):  # nobody listens: stop
                    streams.remove(entry)
                    continue
                step_began = time.perf_counter()
                try:
                    deltas = next(steps)
                except StopIteration:
                    streams.remove(entry)
                    continue
                self._time(steps, started, time.perf_counter() - step_began, group)
                for delta in deltas:
                    self._deliver(group[delta.row], delta, began)

    def _time(
        self, steps: Iterator[list[Delta]], started: set[int], seconds: float, group: list[_Job]
    ) -> None:
        """Fold one step's time into the running means: a stream's first step reads whole
        prompts (and drafts), the others one token a row."""
        if id(steps) in started:
            self.step_seconds = _mean(self.step_seconds, seconds)
            return
        started.add(id(steps))
        positions = len(group) * max(len(j.prompt) + len(j.draft or []) for j in group)
        self.prefill_token_seconds = _mean(self.prefill_token_seconds, seconds / positions)

    def _deliver(self, job: _Job, delta: Delta, began: float) -> None:
        if delta.text or delta.token_ids:
            job.push(self._chunk(job.request, delta))
        if delta.result is not None:
            job.push(self._done(job, delta.result, time.perf_counter() - began))

    def _decode(self, token: int) -> str:
        return str(self.lm.tokenizer.decode([token], clean_up_tokenization_spaces=False))

    def _chunk(self, request: TeacherRequest, delta: Delta) -> TeacherChunk:
        want = max(request.top_k, request.text_top_k or 0)
        top = None
        if want and delta.top_logprobs is not None:
            top = [position[:want] for position in delta.top_logprobs]
        tokens = top_tokens = None
        if request.text_top_k is not None:
            tokens = [self._decode(t) for t in delta.token_ids]
            if request.text_top_k and top is not None:
                top_tokens = [[self._decode(i) for i, _ in p[: request.text_top_k]] for p in top]
        return TeacherChunk(
            text=delta.text,
            token_ids=list(delta.token_ids),
            logprobs=list(delta.logprobs),
            top_logprobs=top,
            tokens=tokens,
            top_tokens=top_tokens,
        )

    def _done(self, job: _Job, result: Generated, seconds: float) -> TeacherDone:
        common: dict[str, Any] = {
            "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "version": self.version,
            "seconds": seconds,
        }
        if not isinstance(result, Verified):
            return TeacherDone(**common)
        common["forward_passes"] = result.forward_passes
        common["forward_passes_without_draft"] = result.forward_passes_without_draft
        if job.draft is None:
            return TeacherDone(**common)
        return TeacherDone(
            **common,
            draft_tokens=result.draft_tokens,
            accepted=result.accepted,
            seconds_saved=self._saved(result),
        )

    def _saved(self, result: Verified) -> float | None:
        """The spared forward passes at the mean decode-step time, less the verification
        pass's reading of the draft at the mean prefill time per token."""
        if self.step_seconds is None or self.prefill_token_seconds is None:
            return None
        spared = result.forward_passes_without_draft - result.forward_passes
        return spared * self.step_seconds - result.draft_tokens * self.prefill_token_seconds


def _mean(old: float | None, new: float | None) -> float | None:
    """A running mean that follows the machine's load."""
    if new is None:
        return old
    return new if old is None else (1 - STEP_SECONDS_WEIGHT) * old + STEP_SECONDS_WEIGHT * new


class LocalTeacher:
    """:class:`TeacherClient` over an engine in this process (no Ray)."""

    def __init__(self, engine: TeacherEngine) -> None:
        self.engine = engine

    async def info(self) -> TeacherInfo:
        return self.engine.info()

    def stream(self, request: TeacherRequest) -> AsyncGenerator[TeacherItem, None]:
        return self.engine.stream(request)
