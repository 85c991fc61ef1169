"""The generative models' own cost, in process (no HTTP, no Ray): the limits every served
row of ``protege bench --task generate`` is set against.

- each model's :func:`~serving.generate.generation.generate_batch` over the bench prompts,
  in static batches of 1 and of 8 (each request of a batch waits for the whole batch);
- the cascade itself, :class:`~serving.generate.service.GenerationService` over a
  :class:`~serving.generate.teacher_engine.LocalTeacher`, asked by concurrent callers as
  the gateway asks it: the same student batcher, decision, teacher engine and draft
  reuse, with a sink that keeps nothing (the served cascade writes its log).

Run at the thread count a replica gets (one), so the limits and the served rows share the
machine's conditions. Every measured request becomes an :class:`Answer`, the shape the
served rows fill from the OpenAI responses too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from serving.contracts.generation_records import GenerationRecord
from serving.generate.config import GenerateCascadeConfig
from serving.generate.events import Failed, Finished, GenerationRequest, Routed, TextDelta
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import LanguageModel, Message, render_chat
from serving.generate.service import GenerationService
from serving.generate.teacher_engine import LocalTeacher, TeacherEngine
from serving.hot_swap import ActiveStudent

T = TypeVar("T")
IN_PROCESS = "in process"
BATCH_SIZES = (1, 8)


@dataclass(frozen=True)
class Answer:
    """One answered request: its text and cost, and the cascade's metadata (a model
    asked alone leaves the cascade's fields at their defaults)."""

    text: str
    completion_tokens: int
    latency_s: float
    first_byte_s: float | None = None
    tier: str = "student"
    escalated: bool = False
    draft: str | None = None  # verified, or why the teacher did not start from the draft
    accepted_share: float | None = None  # when the teacher verified a draft
    teacher_seconds: float | None = None
    teacher_seconds_saved: float | None = None
    student_version: str | None = None  # the student version that answered or drafted


@dataclass
class Measured:
    """One row's requests, in prompt order (None: the request failed), and its wall time."""

    name: str
    stack: str
    answers: list[Answer | None]
    seconds: float


class _Discard:
    """A sink that keeps nothing: the in-process limit pays no log."""

    async def write(self, records: list[GenerationRecord]) -> bool:
        return True


def batched(
    lm: LanguageModel,
    name: str,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch: int,
) -> Measured:
    """Greedy answers in static batches of ``batch`` prompts, in order (after a warm-up)."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    generate_batch(lm, list(prompts[:batch]), SamplingSettings(max_new_tokens=2))
    answers: list[Answer | None] = []
    began = time.perf_counter()
    for first in range(0, len(prompts), batch):
        start = time.perf_counter()
        out = generate_batch(lm, list(prompts[first : first + batch]), settings)
        seconds = time.perf_counter() - start
        answers += [Answer(g.text, g.completion_tokens, seconds) for g in out]
    return Measured(f"{name}, batch {batch}", IN_PROCESS, answers, time.perf_counter() - began)


def model_rows(
    lm: LanguageModel, name: str, messages: Sequence[Sequence[Message]], max_new_tokens: int
) -> list[Measured]:
    """``name`` at every batch size of :data:`BATCH_SIZES`."""
    prompts = [render_chat(lm.tokenizer, m) for m in messages]
    return [batched(lm, name, prompts, max_new_tokens, b) for b in BATCH_SIZES]


def cascade_row(
    name: str,
    config: GenerateCascadeConfig,
    active: ActiveStudent,
    teacher: LanguageModel,
    teacher_version: str,
    messages: Sequence[Sequence[Message]],
    max_new_tokens: int,
    concurrency: int,
    warm_up: Sequence[Sequence[Message]] = (),
) -> Measured:
    """The cascade of ``config`` in process, asked by ``concurrency`` callers at once."""

    async def run() -> Measured:
        batching = config.teacher_batching
        engine = TeacherEngine(
            teacher, teacher_version, batching.max_batch_size, batching.batch_wait_timeout_s
        )
        service = GenerationService(config, lambda: active, LocalTeacher(engine), _Discard())
        settings = SamplingSettings(max_new_tokens=max_new_tokens)
        if warm_up:
            await ask_all(lambda m: ask(service, m, settings), warm_up, concurrency)
        began = time.perf_counter()
        answers = await ask_all(lambda m: ask(service, m, settings), messages, concurrency)
        return Measured(name, IN_PROCESS, answers, time.perf_counter() - began)

    return asyncio.run(run())


async def ask_all(
    call: Callable[[T], Awaitable[Answer]], items: Sequence[T], concurrency: int
) -> list[Answer | None]:
    """``call(item)`` for every item, ``concurrency`` at a time, in the items' order; a
    call that raises gives None."""
    answers: list[Answer | None] = [None] * len(items)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(items)):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            try:
                answers[i] = await call(items[i])
            except Exception as exc:  # counted as failed; the reason printed once a row
                print(f"  request {i} failed: {exc!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


async def ask(
    service: GenerationService, messages: Sequence[Message], settings: SamplingSettings
) -> Answer:
    """One chat through the service's stream of events, timed as a client would."""
    began = time.perf_counter()
    request = GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_ids=service.prompt_ids(messages=messages),
        settings=settings,
        messages=messages,
    )
    texts: list[str] = []
    routed: Routed | None = None
    finished: Finished | None = None
    first_byte = None
    async with aclosing(service.stream(request)) as events:
        async for event in events:
            if isinstance(event, Routed):
                routed, first_byte = event, time.perf_counter() - began
            elif isinstance(event, TextDelta):
                texts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
            elif isinstance(event, Failed):
                raise RuntimeError(event.message)
    if routed is None or finished is None:
        raise RuntimeError("the answer ended without its routing or its end")
    usage = finished.usage
    return Answer(
        text="".join(texts),
        completion_tokens=usage.completion_tokens,
        latency_s=time.perf_counter() - began,
        first_byte_s=first_byte,
        tier=routed.tier,
        escalated=routed.escalated,
        draft=routed.draft,
        accepted_share=usage.accepted_draft_share,
        teacher_seconds=usage.teacher_seconds,
        teacher_seconds_saved=usage.teacher_seconds_saved,
    )
