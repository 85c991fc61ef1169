"""Test parts for the generation service: a student that departs from the teacher's greedy
answer at a chosen token, teachers that fail or hang (wrapping the real in-process one),
a sink and metrics that remember."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import Counter
from collections.abc import AsyncGenerator

import torch

from serving.contracts.threshold import ThresholdRule
from serving.generate.config import GenerateCascadeConfig
from serving.generate.events import Event
from serving.generate.models import LanguageModel
from serving.generate.student import GenerativeStudent
from serving.generate.teacher_engine import TeacherInfo, TeacherItem, TeacherRequest
from serving.hot_swap import ActiveStudent


class Departing(torch.nn.Module):
    """The teacher's own model, except that the token at ``position`` (absolute, in the
    sequence) is forced to another one: a student whose greedy answer is the teacher's up
    to that token, and departs from it there."""

    def __init__(self, inner: torch.nn.Module, position: int) -> None:
        super().__init__()
        self.inner, self.position = inner, position
        self.config = inner.config
        self.generation_config = inner.generation_config

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep):
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )
        logits = out.logits.clone()
        for row in range(logits.shape[0]):
            if int(position_ids[row, -1]) + 1 == self.position:  # predicts that token
                best = int(logits[row, -1].argmax())
                other = (best + 7) % logits.shape[-1]
                other += 3 if other < 3 else 0  # never a special token (an EOS ends it)
                logits[row, -1, other] = logits[row, -1].max() + 10.0
        out.logits = logits
        return out


def student_of(
    lm: LanguageModel,
    *,
    version: str = "student-1",
    digest: str,
    max_prompt_tokens: int = 200,
    max_new_tokens: int = 12,
    draft_min_confidence: float | None = None,
    threshold: float = 0.0,
) -> ActiveStudent:
    model = GenerativeStudent(
        lm=lm,
        version=version,
        manifest=None,
        folder=lm.folder,  # type: ignore[arg-type]
        max_prompt_tokens=max_prompt_tokens,
        max_new_tokens=max_new_tokens,
        draft_min_confidence=draft_min_confidence,
        tokenizer_digest=digest,
    )
    return ActiveStudent(model, ThresholdRule(threshold, f"fixed {threshold}"))


def departing(lm: LanguageModel, position: int) -> LanguageModel:
    return dataclasses.replace(lm, model=Departing(lm.model, position))


def config(tmp_path, **fields) -> GenerateCascadeConfig:
    values = {
        "student": {"path": str(tmp_path)},
        "teacher": {"path": str(tmp_path)},
        "threshold": 0.0,
        "audit_fraction": 0.0,
        "top_logprobs": 4,
        "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.0},
    }
    values.update(fields)
    return GenerateCascadeConfig.model_validate(values)


class Failing:
    """The real teacher client, failing after ``after`` items (0: before its first)."""

    def __init__(self, inner, after: int, error: Exception | None = None) -> None:
        self.inner, self.after = inner, after
        self.error = error or RuntimeError("teacher replica died")
        self.requests: list[TeacherRequest] = []

    async def info(self) -> TeacherInfo:
        return await self.inner.info()

    async def stream(self, request: TeacherRequest) -> AsyncGenerator[TeacherItem, None]:
        self.requests.append(request)
        n = 0
        async with contextlib.aclosing(self.inner.stream(request)) as items:
            async for item in items:
                if n == self.after:
                    raise self.error
                n += 1
                yield item


class Hanging:
    """The real teacher client, waiting after ``after`` items until released (or closed:
    ``closed`` counts the streams closed before their end)."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after = inner, after
        self.release = asyncio.Event()
        self.waiting = 0
        self.closed = 0
        self.requests: list[TeacherRequest] = []

    async def info(self) -> TeacherInfo:
        return await self.inner.info()

    async def stream(self, request: TeacherRequest) -> AsyncGenerator[TeacherItem, None]:
        self.requests.append(request)
        n, ended = 0, False
        try:
            async with contextlib.aclosing(self.inner.stream(request)) as items:
                async for item in items:
                    if n == self.after:
                        self.waiting += 1
                        await self.release.wait()
                    n += 1
                    yield item
            ended = True
        finally:
            if not ended:
                self.closed += 1


class Sink:
    def __init__(self, ok: bool = True) -> None:
        self.ok, self.records, self.writes = ok, [], 0

    async def write(self, records):
        self.writes += 1
        if self.ok:
            self.records += records
        return self.ok


class Metrics:
    """Remembers what the service reported (the replica's is serving.metrics.GenerationMetrics)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple] = Counter()
        self.drafts: list[tuple] = []
        self.ends: list[tuple] = []

    def observe(self, name, value, **tags):
        self.counts[(name, *sorted(tags.values()))] += 1

    def answered(self, tier, outcome, first_byte_s, confidence, reason):
        self.counts[("answered", tier, outcome)] += 1
        self.ends.append((tier, outcome, first_byte_s, reason))

    def tokens(self, model, count):
        self.counts[("tokens", model)] += count

    def draft(self, use, accepted_share, seconds_saved):
        self.drafts.append((use, accepted_share, seconds_saved))


async def collect(events: AsyncGenerator[Event, None]) -> list[Event]:
    return [event async for event in events]
