"""What a draft saves the teacher, measured through the teacher engine, in process.

For each prompt the engine first writes its own greedy answer (no draft: plain
generation, the reference). Then, over a few runs, the same prompt is answered four ways,
one after another so that each run's figures share the machine's load:

    plain   no draft
    whole   the reference itself as the draft: every token accepted
    half    the reference with its middle token changed: the first half accepted
    none    the reference with its first token changed: rejected at once

The drafts are as long as the answer, so the accepted share is what
:mod:`serving.generate.draft_rule` calls it (accepted over drafted tokens). End of
sequence is turned off (``eos_token_ids`` that no token has): every answer runs to
``max_new_tokens``, so the four ways write answers of the same length, and each verified
answer is compared with the reference (it must equal it).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import asdict, dataclass
from typing import Any

from serving.generate.generation import SamplingSettings
from serving.generate.models import LanguageModel, Message, render_chat
from serving.generate.teacher_engine import (
    TeacherChunk,
    TeacherDone,
    TeacherEngine,
    TeacherRequest,
)

CASES = ("plain", "whole", "half", "none")
ACCEPTED_SHARE = {"whole": 1.0, "half": 0.5, "none": 0.0}
NO_EOS = frozenset({-1})


@dataclass(frozen=True)
class DraftRun:
    """One answer of one way: what the engine reported, and whether it equals plain
    greedy generation of the same prompt."""

    prompt: int
    run: int
    case: str
    seconds: float
    forward_passes: int | None
    draft_tokens: int | None
    accepted: int | None
    seconds_saved: float | None  # the engine's estimate (TeacherDone.seconds_saved)
    equal: bool


def drafts_from(reference: Sequence[int], vocab: int) -> dict[str, list[int] | None]:
    """The draft of each way, from the teacher's own greedy answer ``reference``."""
    ids = list(reference)
    if len(ids) < 2:
        raise ValueError("the reference answer needs at least 2 tokens to be half accepted")
    half = len(ids) // 2

    def other(token: int) -> int:
        return (token + 1) % vocab

    return {
        "plain": None,
        "whole": ids,
        "half": [*ids[:half], other(ids[half]), *ids[half + 1 :]],
        "none": [other(ids[0]), *ids[1:]],
    }


async def _answer(
    engine: TeacherEngine,
    messages: Sequence[Message],
    prompt_ids: list[int],
    draft: list[int] | None,
    max_new_tokens: int,
) -> tuple[list[int], TeacherDone]:
    request = TeacherRequest(
        settings=SamplingSettings(max_new_tokens=max_new_tokens),
        messages=messages,
        prompt_ids=prompt_ids,
        ids_digest=engine.digest,
        draft_ids=draft,
    )
    tokens: list[int] = []
    async with aclosing(engine.stream(request)) as items:
        async for item in items:
            if isinstance(item, TeacherChunk):
                tokens += item.token_ids
            elif isinstance(item, TeacherDone):
                return tokens, item
    raise RuntimeError("the teacher's answer ended without its TeacherDone")


def measure_draft_reuse(
    teacher: LanguageModel,
    version: str,
    prompts: Sequence[Sequence[Message]],
    max_new_tokens: int,
    runs: int = 3,
) -> dict[str, Any]:
    """The four ways on every prompt, ``runs`` times (see the module's docstring)."""
    lm = dataclasses.replace(teacher, eos_token_ids=NO_EOS)
    ids = [render_chat(lm.tokenizer, m) for m in prompts]

    async def measure() -> list[DraftRun]:
        engine = TeacherEngine(lm, version, max_batch_size=1, wait_s=0.0)
        references = [
            (await _answer(engine, m, p, None, max_new_tokens))[0]
            for m, p in zip(prompts, ids, strict=True)
        ]
        drafts = [drafts_from(r, engine.vocab) for r in references]
        # one verified draft first: the engine's prefill time (for its estimate) is known
        await _answer(engine, prompts[0], ids[0], references[0], max_new_tokens)
        out = []
        for run in range(runs):
            for i, (messages, prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
                for case in CASES:
                    tokens, done = await _answer(
                        engine, messages, prompt_ids, drafts[i][case], max_new_tokens
                    )
                    out.append(
                        DraftRun(
                            prompt=i,
                            run=run,
                            case=case,
                            seconds=done.seconds,
                            forward_passes=done.forward_passes,
                            draft_tokens=done.draft_tokens,
                            accepted=done.accepted,
                            seconds_saved=done.seconds_saved,
                            equal=tokens == references[i],
                        )
                    )
        return out

    return {
        "teacher": version,
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": [len(p) for p in ids],
        "runs_per_prompt": runs,
        "runs": [asdict(r) for r in asyncio.run(measure())],
    }
