"""An answer as :class:`~serving.generate.events.TextDelta` events: the student's from its
buffer (a kept or degraded answer, generated whole before the first event), the teacher's
from the chunks it streams.

A delta's texts concatenate to the answer's text; its tokens carry their log-probabilities
and the alternatives the client asked for (``want``; None: no log-probabilities).
"""

from __future__ import annotations

from typing import Any

from serving.generate.events import TextDelta, TokenLogprob
from serving.generate.generation import Generated, TopLogprobs
from serving.generate.teacher_engine import TeacherChunk


def _text(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token], clean_up_tokenization_spaces=False))


def token_logprob(
    tokenizer: Any, token: int, logprob: float, top: TopLogprobs, want: int
) -> TokenLogprob:
    """One token, with its ``want`` most likely alternatives, decoded by ``tokenizer``."""
    return TokenLogprob(
        token=_text(tokenizer, token),
        logprob=logprob,
        top=[(_text(tokenizer, i), lp) for i, lp in top[:want]],
        token_id=token,
        top_ids=[i for i, _ in top[:want]],
    )


def buffered_deltas(answer: Generated, tokenizer: Any, want: int | None) -> list[TextDelta]:
    """The whole answer as deltas, one a token whose text is complete (a token that ends
    inside a UTF-8 character goes out with the next)."""
    deltas: list[TextDelta] = []
    sent_chars = sent_tokens = 0
    n = len(answer.token_ids)
    for i in range(n):
        if i == n - 1:
            covered = len(answer.text)
        else:
            prefix = str(
                tokenizer.decode(
                    answer.token_ids[: i + 1],
                    skip_special_tokens=True,
                    clean_up_tokenization_spaces=False,
                )
            )
            covered = min(len(prefix.rstrip("\ufffd")), len(answer.text))
            if covered <= sent_chars:
                continue
        logprobs = None
        if want is not None:
            logprobs = [
                token_logprob(
                    tokenizer,
                    answer.token_ids[j],
                    answer.logprobs[j],
                    answer.top_logprobs[j] if answer.top_logprobs else [],
                    want,
                )
                for j in range(sent_tokens, i + 1)
            ]
        text = answer.text[sent_chars:covered]
        if text or logprobs:
            deltas.append(TextDelta(text, logprobs))
        sent_chars, sent_tokens = max(covered, sent_chars), i + 1
    return deltas


def chunk_delta(chunk: TeacherChunk, want: int | None) -> TextDelta | None:
    """One teacher chunk as a delta (None when it adds nothing the client sees)."""
    logprobs = None
    if want is not None:
        tokens = chunk.tokens or [""] * len(chunk.token_ids)
        logprobs = []
        for j, token in enumerate(chunk.token_ids):
            pairs: TopLogprobs = []
            names: list[str] = []
            if want and chunk.top_logprobs is not None and chunk.top_tokens is not None:
                pairs, names = chunk.top_logprobs[j][:want], chunk.top_tokens[j][:want]
            logprobs.append(
                TokenLogprob(
                    token=tokens[j],
                    logprob=chunk.logprobs[j],
                    top=[(t, lp) for t, (_, lp) in zip(names, pairs, strict=True)],
                    token_id=token,
                    top_ids=[i for i, _ in pairs],
                )
            )
    if not chunk.text and not logprobs:
        return None
    return TextDelta(chunk.text, logprobs)
