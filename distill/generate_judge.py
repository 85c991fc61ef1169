"""Judging a generative student version on live traffic, as it would serve, on greedy
answers on both sides.

The student answers the evaluation records' prompts greedily (answers kept per version and
record, so the current version answers each record once); its confidence is rescored with
the serving scorer over its own tokens; it agrees with the teacher when ROUGE-L F1 between
its answer and the teacher's greedy answer is at least ``agreement_cut`` (the teacher's
greedy answer is the logged one for a greedy escalation, else generated offline, see
:class:`~distill.offline_answers.OfflineAnswers`). Its threshold is calibrated for the
target agreement on the live calibration split, weighted by 1 / inclusion probability,
when that split holds enough sampled records; else on the task's traffic prompts less
every prompt the candidate trained on. The gate split, kept apart, is what the gate
judges (:func:`distill.gate.decide`); on a gold file, ROUGE-L against the reference is the
non-inferiority figure (the gate's "gold correct", as a number in [0, 1]).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from distill import gate
from distill.causal_lm import answer_logits, collate
from distill.dataset import Window
from distill.generation_examples import prompt_ids, training_examples
from distill.greedy_cache import Greedy, GreedyCache
from distill.judge import eval_set
from distill.offline_answers import OfflineAnswers, TeacherText
from distill.prompts import TaskPrompt
from distill.splits import normalise
from serving.contracts.generation_records import GenerationRecord
from serving.contracts.manifest import Calibration, make_calibration, read_manifest, weights_digest
from serving.generate.agreement import rouge_l_many
from serving.generate.generation import SamplingSettings
from serving.generate.models import LanguageModel, load_language_model
from serving.generate.scorers import SCORERS


@dataclass(frozen=True)
class JudgeSettings:
    scorer: str
    agreement_cut: float
    target_agreement: float
    min_calibration_sampled: int
    max_new_tokens: int
    batch_size: int = 8


def prompt_key(prompt: TaskPrompt) -> str:
    """A task prompt's cache key: a digest of its kind and exact text (a completion and a
    one-message chat of the same words render differently)."""
    exact = json.dumps(prompt.chat() or {"prompt": prompt.prompt}, sort_keys=True)
    return "prompt:" + hashlib.sha256(exact.encode()).hexdigest()[:24]


class GenerateJudge:
    def __init__(
        self,
        settings: JudgeSettings,
        teacher: OfflineAnswers,
        window: Window[GenerationRecord],
        cache: Path,
        *,
        traffic: Sequence[TaskPrompt] = (),
        gold: Sequence[TaskPrompt] = (),
        trained_on: set[str] = frozenset(),  # type: ignore[assignment]
        device: str = "auto",
    ) -> None:
        self.settings, self.cache, self.device = settings, cache, device
        self.cal_records = window.evaluation["calibration"]
        self.gate_records = window.evaluation["gate"]
        self.gate_set = eval_set(self.gate_records)  # type: ignore[arg-type]
        self.gate_answers = teacher.greedy(self.gate_records)
        self.gate_teacher = [a.text for a in self.gate_answers]
        self.likelihood: dict[str, float | None] = {}  # per version: see teacher_likelihood
        self.students: dict[str, GreedyCache] = {}
        self.cal_sampled = sum(r.reason == "audit" for r in self.cal_records)
        self.live = self.cal_sampled >= settings.min_calibration_sampled or (
            not traffic and self.cal_sampled > 0
        )
        if not self.live and not traffic:
            raise ValueError(
                "no calibration data: the log's calibration split holds no sampled records "
                "and the config names no traffic sample (set `traffic`)"
            )
        self.traffic = [p for p in traffic if normalise(p.split_text) not in trained_on]
        self.traffic_dropped = len(traffic) - len(self.traffic)
        if not self.live and not self.traffic:
            raise ValueError(
                "every prompt of the traffic sample was trained on: nothing left to "
                "calibrate on (serve more traffic so the log's calibration split has "
                "enough sampled records, or give a traffic sample of other prompts)"
            )
        teacher_cache = GreedyCache(
            teacher.teacher, teacher.version, cache, settings.max_new_tokens, settings.batch_size
        )
        if self.live:
            self.cal_teacher = [a.text for a in teacher.greedy(self.cal_records)]
        else:
            self.cal_teacher = [a.text for a in _answer(teacher_cache, self.traffic)]
        self.gold = list(gold)
        self.teacher_gold: np.ndarray | None = None
        if self.gold:
            answers = [a.text for a in _answer(teacher_cache, self.gold)]
            self.teacher_gold = rouge_l_many(answers, [p.reference or "" for p in self.gold])
        self.teacher_seconds = teacher_cache.seconds

    def describe_calibration(self) -> str:
        if self.live:
            return (
                f"{len(self.cal_records)} live records of the calibration split "
                f"({self.cal_sampled} sampled), weighted by 1/inclusion probability"
            )
        return (
            f"{len(self.traffic)} prompts of the task's traffic sample, less "
            f"{self.traffic_dropped} the candidate trained on (the log's calibration split "
            f"has {self.cal_sampled} sampled records, fewer than "
            f"{self.settings.min_calibration_sampled})"
        )

    def __call__(self, folder: Path) -> tuple[gate.Judged, Calibration]:
        settings = self.settings
        manifest = read_manifest(folder)
        version = manifest.version if manifest else f"student-{weights_digest(folder)}"
        student = load_language_model(folder, device=self.device)
        answers = GreedyCache(
            student, version, self.cache, settings.max_new_tokens, settings.batch_size
        )
        self.students[version] = answers  # its answers' count and seconds, for the report
        if self.live:
            mine = _answer_records(answers, student, self.cal_records)
            weights = np.array([1 / r.inclusion_probability for r in self.cal_records])
            kind = "live_traffic"
        else:
            mine, weights, kind = _answer(answers, self.traffic), None, "traffic_sample"
        calibration = make_calibration(
            {name: fn([a.logprobs for a in mine]) for name, fn in SCORERS.items()},
            _agree(mine, self.cal_teacher, settings.agreement_cut),
            self.describe_calibration(),
            weights=weights,
            kind=kind,
        )
        threshold = calibration.threshold(
            settings.scorer, target_agreement=settings.target_agreement
        )
        scorer = SCORERS[settings.scorer]
        self.likelihood[version] = teacher_likelihood(
            student, self.gate_records, self.gate_answers, settings.batch_size
        )
        on_gate = _answer_records(answers, student, self.gate_records)
        judged = gate.Judged(
            version,
            threshold,
            confidence=scorer([a.logprobs for a in on_gate]) if on_gate else np.zeros(0),
            agrees=_agree(on_gate, self.gate_teacher, settings.agreement_cut),
        )
        if self.gold:
            on_gold = _answer(answers, self.gold)
            references = [p.reference or "" for p in self.gold]
            judged = gate.Judged(
                version,
                threshold,
                judged.confidence,
                judged.agrees,
                gold_confidence=scorer([a.logprobs for a in on_gold]),
                gold_correct=rouge_l_many([a.text for a in on_gold], references),
            )
        return judged, calibration


def teacher_likelihood(
    lm: LanguageModel,
    records: Sequence[GenerationRecord],
    answers: Sequence[TeacherText],
    batch_size: int = 8,
) -> float | None:
    """The student's mean log-likelihood per token of the teacher's greedy answers to the
    gate records (the end of turn included where the teacher stopped): how close it came
    to imitating the teacher, reported beside the gate's figures (None: no tokens)."""
    examples = training_examples(records, answers, lm.tokenizer, "sequence")
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for first in range(0, len(examples), batch_size):
            chunk = examples[first : first + batch_size]
            logits, targets = answer_logits(lm.model, collate(chunk, lm.pad_token_id))
            total -= float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            tokens += int(targets.numel())
    return round(total / tokens, 6) if tokens else None


def _answer(cache: GreedyCache, prompts: Sequence[TaskPrompt]) -> list[Greedy]:
    return cache.answers([prompt_key(p) for p in prompts], [p.render(cache.lm) for p in prompts])


def _answer_records(
    cache: GreedyCache, lm: LanguageModel, records: Sequence[GenerationRecord]
) -> list[Greedy]:
    """Greedy answers under each record's own limits (its max_new_tokens, within the
    version's, and its stop strings), as the teacher's greedy answers were generated."""
    prompts = [prompt_ids(lm.tokenizer, r) for r in records]
    settings = [
        SamplingSettings(
            max_new_tokens=min(r.sampling.max_new_tokens, cache.max_new_tokens),
            stop=tuple(r.sampling.stop),
        )
        for r in records
    ]
    return cache.answers([r.record_id for r in records], prompts, settings)


def _agree(mine: Sequence[Greedy], teacher: Sequence[str], cut: float) -> np.ndarray:
    if not mine:
        return np.zeros(0, dtype=bool)
    return rouge_l_many([a.text for a in mine], list(teacher)) >= cut
