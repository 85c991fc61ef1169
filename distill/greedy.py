"""Greedy answers offline, and a generative student's calibration from them.

A generative student's threshold is set on its greedy answers: each answer's confidence
under every scorer, and whether it agrees with the teacher's greedy answer to the same
prompt (ROUGE-L F1 at least ``agreement_cut``). The build of the default pair, ``protege
init`` on a generative task and the distillation job all calibrate this way, on prompts
the student never trained on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from serving.contracts.manifest import Calibration, make_calibration
from serving.contracts.threshold import should_escalate, threshold_for_agreement
from serving.generate.agreement import rouge_l_many
from serving.generate.config import DEFAULT_SCORER
from serving.generate.draft_rule import draft_cut
from serving.generate.generation import Generated, SamplingSettings, generate_batch
from serving.generate.models import LanguageModel
from serving.generate.scorers import SCORERS

TABLE_TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Answers:
    """Greedy answers to a list of prompts, and what they cost."""

    generated: list[Generated]
    seconds: float

    @property
    def texts(self) -> list[str]:
        return [g.text for g in self.generated]

    @property
    def stop_rate(self) -> float:
        return float(np.mean([g.finish_reason == "stop" for g in self.generated]))

    @property
    def tokens_per_s(self) -> float:
        return sum(g.completion_tokens for g in self.generated) / max(self.seconds, 1e-9)


def greedy_answers(
    lm: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int
) -> Answers:
    """Greedy answers to rendered prompts, ``batch_size`` at a time (sorted by length, so
    a batch pads little), returned in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    settings = SamplingSettings(max_new_tokens=max_new_tokens)
    out: dict[int, Generated] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            batch = generate_batch(lm, [prompts[i] for i in chunk], settings)
            for i, generated in zip(chunk, batch, strict=True):
                out[i] = generated
    return Answers([out[i] for i in range(len(prompts))], time.perf_counter() - start)


def answer_ids(generated: Generated, eos_id: int) -> list[int]:
    """What the model wrote, with the end-of-turn token when it stopped on its own."""
    return list(generated.token_ids) + ([eos_id] if generated.finish_reason == "stop" else [])


def accepted_share(draft: Sequence[int], teacher: Sequence[int]) -> float:
    """The share of the student's draft the teacher keeps at temperature 0: the common
    prefix of the two greedy answers (what one verification pass accepts)."""
    if not draft:
        return 0.0
    same = 0
    for a, b in zip(draft, teacher, strict=False):
        if a != b:
            break
        same += 1
    return same / len(draft)


def escalation_table(
    confidences: dict[str, np.ndarray], agrees: np.ndarray, targets: Sequence[float] = TABLE_TARGETS
) -> dict[str, dict[str, float]]:
    """For each target agreement, the share of traffic each scorer escalates to reach it."""
    table: dict[str, dict[str, float]] = {}
    for target in targets:
        table[f"{target:.2f}"] = {
            name: float(np.mean(should_escalate(c, threshold_for_agreement(c, agrees, target))))
            for name, c in confidences.items()
        }
    return table


def calibrate(
    student: Answers,
    teacher: Answers,
    agreement_cut: float,
    source: str,
    scorer: str = DEFAULT_SCORER,
) -> tuple[Calibration, dict[str, Any]]:
    """A student's calibration from its greedy answers and the teacher's to the same
    prompts: confidences under every scorer, agreement (ROUGE-L >= ``agreement_cut``),
    and the draft rule's cut, on the serving ``scorer``'s scale, from the share of each
    draft the teacher would keep."""
    logprobs = [g.logprobs for g in student.generated]
    confidences = {name: scorer(logprobs) for name, scorer in SCORERS.items()}
    rouge = rouge_l_many(student.texts, teacher.texts)
    agrees = rouge >= agreement_cut
    calibration = make_calibration(confidences, agrees, source)
    shares = np.array(
        [
            accepted_share(a.token_ids, b.token_ids)
            for a, b in zip(student.generated, teacher.generated, strict=True)
        ]
    )
    cut = draft_cut(confidences[scorer], shares)
    figures = {
        "traffic_prompts": len(student.generated),
        "student_teacher_rouge_l": float(rouge.mean()),
        "agreement": float(agrees.mean()),
        "accepted_draft_share": float(shares.mean()),
        "draft_min_confidence": cut,
        "drafts_used": float(np.mean(confidences[scorer] >= cut)),
        "escalation_by_target": escalation_table(confidences, agrees),
    }
    return calibration, figures
