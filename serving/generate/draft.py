"""The teacher starts from the student's draft instead of from nothing.

One batched teacher forward pass over prompt + draft (left padded) gives the teacher's
greedy choice at every draft position. A row keeps the longest prefix of its draft that
the teacher would have chosen itself, plus the teacher's own choice at the first
disagreement (or after the whole draft), all from that one pass; then the ordinary decode
loop (:func:`serving.generate.generation.decode_steps`) generates the rest greedily. Every
token is the teacher's greedy choice, picked by the same code as plain generation, so the
answer is the teacher's greedy answer (up to the float rounding by which a batched pass
and one-token steps differ, which matters only on near-ties).

The cache after the verification pass holds each row's whole draft. Rows accept
different counts, so a single ``cache.crop()`` (one count for the whole batch) does not
fit: the rows are re-packed instead. Each unfinished row's kept positions (its prompt
and accepted draft) are gathered to the right end of a new, left-padded cache as long as
the longest kept row, rejected tokens and finished rows dropped. Keys carry their
rotary positions already, so moving them along the cache changes nothing; the batch then
looks exactly as if plain generation had produced the accepted tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import cast

import torch
from transformers import DynamicCache

from serving.generate.generation import (
    DecodeBatch,
    Delta,
    Generated,
    RowState,
    SamplingSettings,
    choose,
    collect,
    decode_steps,
    forward,
    left_pad,
    new_rows,
)
from serving.generate.models import LanguageModel


@dataclass
class Verified(Generated):
    """The teacher's greedy answer, and what the draft saved.

    ``accepted`` counts the draft tokens that are the answer's first tokens (at most the
    answer's length); ``draft_tokens`` the draft's length. ``forward_passes`` is what the
    teacher ran for this row (the verification pass included);
    ``forward_passes_without_draft`` what plain greedy generation runs for the same answer
    (one a token the teacher chooses). The verification pass reads prompt + draft where
    plain generation's first pass reads the prompt alone, slightly more work.
    """

    accepted: int
    draft_tokens: int
    forward_passes: int
    forward_passes_without_draft: int

    @property
    def accepted_share(self) -> float:
        """Accepted over drafted tokens (1.0 for an empty draft: nothing was rejected)."""
        return self.accepted / self.draft_tokens if self.draft_tokens else 1.0


def _verified(row: RowState, accepted: int, draft_tokens: int) -> Verified:
    base = row.result()
    values = {f.name: getattr(base, f.name) for f in fields(Generated)}
    return Verified(
        **values,
        accepted=min(accepted, len(base.token_ids)),
        draft_tokens=draft_tokens,
        forward_passes=row.forward_passes,
        forward_passes_without_draft=row.chosen,
    )


def _repack(
    cache: DynamicCache, rows: list[int], ends: list[int], keep: list[int], device: torch.device
) -> torch.Tensor:
    """Keep, of batch row ``rows[j]``, the cache positions ``[ends[j] - keep[j], ends[j])``
    right-aligned in a new left-padded cache; returns its attention mask."""
    width = max(keep)
    q = torch.arange(width, device=device)[None, :]
    offset = torch.tensor([width - k for k in keep], device=device)[:, None]
    start = torch.tensor([e - k for e, k in zip(ends, keep, strict=True)], device=device)
    index = (start[:, None] + q - offset).clamp(min=0)  # padding reads position 0, masked
    batch = torch.tensor(rows, device=device)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError("draft reuse needs a cache of full-attention layers")
        for name in ("keys", "values"):
            states = getattr(layer, name)[batch]
            gather = index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
            setattr(layer, name, states.gather(2, gather))
    return (q >= offset).long()


def verify_drafts_stream(
    teacher: LanguageModel,
    prompts: Sequence[Sequence[int]],
    drafts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    top_k: int = 0,
    stop: Sequence[Sequence[str]] | None = None,
) -> Iterator[list[Delta]]:
    """The teacher's greedy answers to ``prompts`` (token ids), starting from ``drafts``
    (the student's answer tokens, without EOS; an empty draft is plain generation), as a
    stream of deltas. The first step's delta of a row holds its accepted prefix and the
    teacher's next token together; a row's last delta carries its :class:`Verified`."""
    n = len(prompts)
    if len(drafts) != n or len(max_new_tokens) != n or (stop is not None and len(stop) != n):
        raise ValueError("prompts, drafts, max_new_tokens (and stop) need one entry a row")
    if not n:
        return
    vocab = teacher.model.get_output_embeddings().weight.shape[0]
    if any(not 0 <= t < vocab for d in drafts for t in d):
        raise ValueError(f"a draft holds a token id outside the teacher's vocabulary ({vocab})")
    settings = [
        SamplingSettings(max_new_tokens=m, stop=tuple(stop[i]) if stop else ())
        for i, m in enumerate(max_new_tokens)
    ]
    rows = new_rows(teacher, prompts, settings, top_k)
    lengths = [len(d) for d in drafts]
    longest = max(lengths)
    ids, mask, positions = left_pad(
        teacher, [[*p, *d] for p, d in zip(prompts, drafts, strict=True)]
    )
    cache = DynamicCache()
    logits = forward(teacher, ids, mask, positions, cache, longest + 1)
    # row r's choices after its prompt and each of its draft tokens: its last d_r + 1
    picks = [logits[r, longest - d :] for r, d in enumerate(lengths)]
    owners = [row for row, p in zip(rows, picks, strict=True) for _ in range(p.shape[0])]
    tokens, logprobs, tops = choose(torch.cat(picks), owners)
    accepted: list[int] = []
    next_tokens: list[int] = []  # the teacher's own choice after each accepted prefix
    deltas, at = [], 0
    for row, draft in zip(rows, drafts, strict=True):
        row.forward_passes = 1
        a = 0
        while a < len(draft) and tokens[at + a] == draft[a]:
            a += 1
        for j in range(a + 1):  # the accepted prefix, then the teacher's own next token
            row.push(tokens[at + j], logprobs[at + j], tops[at + j])
        accepted.append(a)
        next_tokens.append(tokens[at + a])
        at += len(draft) + 1
        delta = row.delta()
        if delta is not None:
            if delta.result is not None:
                delta = _with_result(delta, _verified(row, a, len(draft)))
            deltas.append(delta)
    if deltas:
        yield deltas
    live = [i for i, row in enumerate(rows) if not row.done]
    if not live:
        return
    width = ids.shape[1]
    keep = [len(prompts[i]) + accepted[i] for i in live]
    ends = [width - lengths[i] + accepted[i] for i in live]
    mask = _repack(cache, live, ends, keep, ids.device)
    positions = torch.tensor(keep, device=mask.device)
    batch = DecodeBatch(teacher, [rows[i] for i in live], cache, mask, positions)
    for step in decode_steps(batch, [next_tokens[i] for i in live]):
        yield [
            _with_result(d, _verified(rows[d.row], accepted[d.row], lengths[d.row]))
            if d.result is not None
            else d
            for d in step
        ]


def _with_result(delta: Delta, result: Verified) -> Delta:
    return dataclasses.replace(delta, result=result)


def verify_drafts(
    teacher: LanguageModel,
    prompts: Sequence[Sequence[int]],
    drafts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    top_k: int = 0,
    stop: Sequence[Sequence[str]] | None = None,
) -> list[Verified]:
    """:func:`verify_drafts_stream`, run to the end: one :class:`Verified` a row."""
    stream = verify_drafts_stream(teacher, prompts, drafts, max_new_tokens, top_k, stop)
    return cast(list[Verified], collect(stream, len(prompts)))
