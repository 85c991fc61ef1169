"""Batched generation with a hand-written decode loop, one set of sampling settings a row.

Prompts are left padded into one static batch; each step feeds every unfinished row's
last token through the model over a shared :class:`~transformers.DynamicCache`. A row
that finishes (its EOS, a stop string, ``max_new_tokens``) leaves the batch, so it costs
nothing afterwards. transformers' ``generate`` cannot do this: it takes one temperature,
one top-p and one set of stop strings for the whole batch.

For every emitted token the row keeps its log-probability under the model's RAW logits at
temperature 1 (``log_softmax(logits)``, before temperature or top-p: the confidence
scorers and the teacher's soft targets need the model's own distribution), and on request
the top-k of that distribution.

The building blocks (:class:`RowState`, :class:`DecodeBatch`, :func:`decode_steps`) are
shared with draft verification (:mod:`serving.generate.draft`), which starts the same loop
from a verified prefix: the same code picks every token, so both give the same answer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from serving.generate.models import LanguageModel

FinishReason = Literal["stop", "length"]
TopLogprobs = list[tuple[int, float]]
"""One position's top-k: ``(token id, log-probability)`` pairs, most likely first."""


@dataclass(frozen=True)
class SamplingSettings:
    """How one row is generated. ``temperature`` 0 is greedy; ``seed`` makes sampling
    repeatable on the same machine and batch (best effort, as in OpenAI's API)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("a stop string must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generated:
    """One row's answer.

    ``token_ids`` are the answer's tokens (never the EOS that ended it); ``text`` is their
    decoded text, cut before the stop string that ended the row (the last token may then
    carry the start of the stop string: tokens are kept up to the first one that covers
    the text). ``logprobs[i]`` is ``token_ids[i]``'s log-probability under the raw logits;
    ``top_logprobs[i]`` the top-k at that position, when asked for.
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[TopLogprobs] | None
    finish_reason: FinishReason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Delta:
    """What one row added in one step of a stream.

    The texts of a row's deltas concatenate to its final text, their tokens to its final
    tokens. Text that may still turn out to be the start of a stop string, or an
    incomplete UTF-8 character, is held back until it is known. The row's last delta
    carries ``finish_reason`` and the whole ``result``.
    """

    row: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[TopLogprobs] | None
    finish_reason: FinishReason | None = None
    result: Generated | None = None


@dataclass
class RowState:
    """One row while it is generated: what it emitted, what its stream already sent."""

    index: int
    settings: SamplingSettings
    prompt_tokens: int
    lm: LanguageModel
    top_k: int = 0
    generator: torch.Generator | None = None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # text length covered by token_ids[: i + 1]
    text: str = ""
    finish_reason: FinishReason | None = None
    chosen: int = 0  # tokens the model chose for this row (the EOS and cut tokens included)
    forward_passes: int = 0  # forward passes this row took part in
    sent_chars: int = 0
    sent_tokens: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int, logprob: float, top: TopLogprobs | None) -> None:
        """Take the model's next choice for this row; it may end the row."""
        if self.done:
            return
        self.chosen += 1
        if token in self.lm.eos_token_ids:
            self.finish_reason = "stop"
            return
        self.token_ids.append(token)
        self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        full = decode(self.lm, self.token_ids)
        # an incomplete UTF-8 character decodes as U+FFFD until its last byte comes
        covered = len(full.rstrip("\ufffd"))
        self.ends.append(max(covered, self.ends[-1] if self.ends else 0))
        cut = _first_stop(full, self.settings.stop)
        if cut is not None:
            self.text = full[:cut]
            kept = _covering(self.ends, cut)
            del self.token_ids[kept:], self.logprobs[kept:], self.top_logprobs[kept:]
            del self.ends[kept:]
            self.finish_reason = "stop"
        else:
            self.text = full
            if len(self.token_ids) >= self.settings.max_new_tokens:
                self.finish_reason = "length"

    def delta(self) -> Delta | None:
        """What is new since the last delta (None when nothing is)."""
        if self.done:
            end_chars, end_tokens = len(self.text), len(self.token_ids)
        else:
            end_chars = self.ends[-1] if self.ends else 0
            end_chars -= _held_back(self.text[:end_chars], self.settings.stop)
            end_chars = max(end_chars, self.sent_chars)
            end_tokens = max(_covering(self.ends, end_chars), self.sent_tokens)
        if not self.done and end_chars == self.sent_chars and end_tokens == self.sent_tokens:
            return None
        tokens = slice(self.sent_tokens, end_tokens)
        delta = Delta(
            row=self.index,
            text=self.text[self.sent_chars : end_chars],
            token_ids=self.token_ids[tokens],
            logprobs=self.logprobs[tokens],
            top_logprobs=self.top_logprobs[tokens] if self.top_k else None,
            finish_reason=self.finish_reason,
            result=self.result() if self.done else None,
        )
        self.sent_chars, self.sent_tokens = end_chars, end_tokens
        return delta

    def result(self) -> Generated:
        if self.finish_reason is None:
            raise RuntimeError(f"row {self.index} is still being generated")
        return Generated(
            token_ids=list(self.token_ids),
            text=self.text,
            logprobs=list(self.logprobs),
            top_logprobs=list(self.top_logprobs) if self.top_k else None,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
        )


def decode(lm: LanguageModel, token_ids: list[int]) -> str:
    """The text of ``token_ids`` (special tokens left out, spaces as the tokens have them)."""
    text = lm.tokenizer.decode(
        token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return text if isinstance(text, str) else "".join(text)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string."""
    held = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:n]):
                held = n
                break
    return held


def _covering(ends: list[int], chars: int) -> int:
    """How many tokens it takes to cover the first ``chars`` characters."""
    if chars <= 0:
        return 0
    for i, end in enumerate(ends):
        if end >= chars:
            return i + 1
    return len(ends)


@dataclass
class DecodeBatch:
    """The unfinished rows and their shared cache. ``mask`` (rows, cached length) marks
    real positions; ``positions`` holds each row's count of real tokens so far (the
    position its next token takes)."""

    lm: LanguageModel
    rows: list[RowState]
    cache: DynamicCache
    mask: torch.Tensor
    positions: torch.Tensor

    def keep_unfinished(self) -> None:
        """Drop finished rows from the batch (and their cache)."""
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if keep:
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]


_CACHE_KWARG: dict[type, str] = {}


def forward(
    lm: LanguageModel,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
    logits_to_keep: int,
) -> torch.Tensor:
    """One forward pass extending ``cache``; the last ``logits_to_keep`` positions' logits."""
    kind = type(lm.model)
    if kind not in _CACHE_KWARG:  # transformers renamed past_key_values to cache in 5.x
        names = inspect.signature(lm.model.forward).parameters
        _CACHE_KWARG[kind] = "cache" if "cache" in names else "past_key_values"
    kwargs: dict[str, Any] = {_CACHE_KWARG[kind]: cache}
    with torch.inference_mode():
        out = lm.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
    return out.logits


def choose(
    logits: torch.Tensor, rows: Sequence[RowState]
) -> tuple[list[int], list[float], list[TopLogprobs | None]]:
    """Each row's next token from its logits (rows, vocabulary): argmax when greedy, else
    sampled at the row's temperature and top-p; with its raw log-probability and top-k."""
    raw = logits if logits.dtype == torch.float64 else logits.float()
    logp = torch.log_softmax(raw, dim=-1)
    tokens = raw.argmax(dim=-1)
    for i, row in enumerate(rows):
        if not row.settings.greedy:
            tokens[i] = _sample(raw[i], row.settings, row.generator)
    chosen = logp.gather(1, tokens[:, None])[:, 0]
    k = max((row.top_k for row in rows), default=0)
    tops: list[TopLogprobs | None] = [None] * len(rows)
    if k:
        top_values, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        values, ids = top_values.tolist(), top_ids.tolist()
        for i, row in enumerate(rows):
            if row.top_k:
                tops[i] = list(zip(ids[i][: row.top_k], values[i][: row.top_k], strict=True))
    return tokens.tolist(), chosen.tolist(), tops


def _sample(
    logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None
) -> torch.Tensor:
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[0]
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < settings.top_p  # the most likely always stays
    choice = torch.multinomial(sorted_p * keep, 1, generator=generator)
    return order[choice][0]


def decode_steps(batch: DecodeBatch, next_tokens: list[int]) -> Iterator[list[Delta]]:
    """Feed ``next_tokens`` (one a row of ``batch``; finished rows' are ignored), pick the
    next, until every row ends."""
    next_tokens = [t for t, row in zip(next_tokens, batch.rows, strict=True) if not row.done]
    batch.keep_unfinished()
    while batch.rows:
        ids = torch.tensor(next_tokens, device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        logits = forward(
            batch.lm, ids[:, None], batch.mask, batch.positions[:, None], batch.cache, 1
        )
        batch.positions = batch.positions + 1
        tokens, logprobs, tops = choose(logits[:, -1], batch.rows)
        deltas = []
        for row, token, logprob, top in zip(batch.rows, tokens, logprobs, tops, strict=True):
            row.forward_passes += 1
            row.push(token, logprob, top)
            delta = row.delta()
            if delta is not None:
                deltas.append(delta)
        if deltas:
            yield deltas
        next_tokens = [t for t, row in zip(tokens, batch.rows, strict=True) if not row.done]
        batch.keep_unfinished()


def left_pad(
    lm: LanguageModel, sequences: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, position ids), left padded to the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), lm.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(lm.device), mask.to(lm.device), positions.to(lm.device)


def new_rows(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings | Sequence[SamplingSettings],
    top_k: int,
) -> list[RowState]:
    """One :class:`RowState` a prompt (one settings for all, or one a prompt)."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    per_row = [settings] * len(prompts) if isinstance(settings, SamplingSettings) else settings
    if len(per_row) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(per_row)} sampling settings")
    rows = []
    for i, (prompt, s) in enumerate(zip(prompts, per_row, strict=True)):
        generator = None
        if s.seed is not None and not s.greedy:
            generator = torch.Generator(device=lm.device).manual_seed(s.seed)
        rows.append(RowState(i, s, len(prompt), lm, top_k=top_k, generator=generator))
    return rows


def generate_stream(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings | Sequence[SamplingSettings],
    top_k: int = 0,
) -> Iterator[list[Delta]]:
    """Generate for ``prompts`` (token ids) in one static batch, yielding each step's
    deltas (only rows with something new). Every row's last delta carries its result."""
    if not prompts:
        return
    rows = new_rows(lm, prompts, settings, top_k)
    ids, mask, positions = left_pad(lm, prompts)
    cache = DynamicCache()
    logits = forward(lm, ids, mask, positions, cache, 1)
    tokens, logprobs, tops = choose(logits[:, -1], rows)
    deltas = []
    for row, token, logprob, top in zip(rows, tokens, logprobs, tops, strict=True):
        row.forward_passes += 1
        row.push(token, logprob, top)
        delta = row.delta()
        if delta is not None:
            deltas.append(delta)
    if deltas:
        yield deltas
    batch = DecodeBatch(lm, rows, cache, mask, positions[:, -1] + 1)
    yield from decode_steps(batch, tokens)


def collect(stream: Iterator[list[Delta]], n: int) -> list[Generated]:
    """The results of a stream over ``n`` rows, in row order."""
    results: list[Generated | None] = [None] * n
    for deltas in stream:
        for delta in deltas:
            if delta.result is not None:
                results[delta.row] = delta.result
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:
        raise RuntimeError(f"the stream ended without a result for rows {missing}")
    return [r for r in results if r is not None]


def generate_batch(
    lm: LanguageModel,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings | Sequence[SamplingSettings],
    top_k: int = 0,
) -> list[Generated]:
    """:func:`generate_stream`, run to the end: one :class:`Generated` a prompt."""
    return collect(generate_stream(lm, prompts, settings, top_k), len(prompts))
