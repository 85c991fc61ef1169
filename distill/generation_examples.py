"""Training pairs from generation records: the prompt in the student's tokens, the
teacher's answer as the target.

- ``distillation: token``: the teacher's tokens and logged top-k
  (:class:`~distill.token_kd.TopKExample`); they are ids of the teacher's tokenizer, which
  ``protege init`` made sure is the student's. An answer without a top-k (a remote teacher
  whose tokens could not be named) trains on its text, cross-entropy only.
- ``distillation: sequence``: the teacher's text in the student's tokens, cross-entropy
  only (any two tokenizers).

An answer that ended on its own gets the end-of-turn token, so the student learns to stop;
one cut at its token limit does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from transformers import PreTrainedTokenizerBase

from distill.causal_lm import CausalExample
from distill.offline_answers import TeacherText
from distill.token_kd import TopKExample
from serving.contracts.generation_records import GenerationRecord
from serving.generate.models import render_chat, render_completion

Distillation = Literal["token", "sequence"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, record: GenerationRecord) -> list[int]:
    """The record's prompt as the gateway renders it for this tokenizer."""
    if record.messages is not None:
        chat = [{"role": m.role, "content": m.content} for m in record.messages]
        return render_chat(tokenizer, chat)
    return render_completion(tokenizer, record.prompt or "")


def training_examples(
    records: Sequence[GenerationRecord],
    answers: Sequence[TeacherText],
    tokenizer: PreTrainedTokenizerBase,
    distillation: Distillation,
) -> list[CausalExample]:
    """One example per record whose answer has at least one target token."""
    eos = int(tokenizer.eos_token_id)
    examples: list[CausalExample] = []
    for record, answer in zip(records, answers, strict=True):
        end = [eos] if answer.stopped else []
        prompt = prompt_ids(tokenizer, record)
        top = answer.top if distillation == "token" else None
        if top is not None and top.tokens:
            examples.append(
                TopKExample(
                    prompt, list(top.tokens) + end, top_ids=top.ids, top_logprobs=top.logprobs
                )
            )
            continue
        tokens = list(tokenizer(answer.text, add_special_tokens=False)["input_ids"]) + end
        if tokens:
            examples.append(CausalExample(prompt, tokens))
    return examples
