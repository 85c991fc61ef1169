"""The generative demo's fixed yardstick beside the live-traffic estimates: the gold
prompts the distillation job also judges on (the same seeded sample, so each version's
greedy answers are generated once and shared with the judge), which no model trained or
calibrated on.

A student version is measured as it would serve (its threshold from its manifest's
calibration, for the demo's target agreement) and by the target figure: the escalation a
cascade needs to agree with the teacher on ``target`` of these prompts (agreement:
ROUGE-L F1 of the two greedy answers at least ``agreement_cut``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill.evaluate import bootstrap_interval
from distill.generate_judge import prompt_key
from distill.greedy_cache import Greedy, GreedyCache
from distill.needed import escalation_needed
from distill.prompts import TaskPrompt
from serving.contracts.manifest import read_manifest, weights_digest
from serving.contracts.threshold import should_escalate
from serving.generate.agreement import rouge_l_many
from serving.generate.models import LanguageModel, load_language_model
from serving.generate.scorers import SCORERS


@dataclass(frozen=True)
class HoldoutSettings:
    scorer: str
    agreement_cut: float
    target_agreement: float
    max_new_tokens: int
    batch_size: int = 8


class GenerateHoldout:
    def __init__(
        self,
        prompts: list[TaskPrompt],
        teacher: LanguageModel,
        teacher_version: str,
        cache: Path,
        settings: HoldoutSettings,
        device: str = "auto",
    ) -> None:
        if not prompts or any(p.reference is None for p in prompts):
            raise ValueError("the holdout needs gold prompts, each with its reference answer")
        self.prompts, self.cache, self.settings, self.device = prompts, cache, settings, device
        self.references = [p.reference or "" for p in prompts]
        answers = self._answers(teacher, teacher_version)
        self.teacher_texts = [a.text for a in answers]
        self.teacher_gold = rouge_l_many(self.teacher_texts, self.references)

    def _answers(self, lm: LanguageModel, version: str) -> list[Greedy]:
        s = self.settings
        cache = GreedyCache(lm, version, self.cache, s.max_new_tokens, s.batch_size)
        return cache.answers(
            [prompt_key(p) for p in self.prompts], [p.render(lm) for p in self.prompts]
        )

    def figures(self, folder: Path) -> dict[str, Any]:
        """One version's figures on the holdout, as it would serve."""
        s = self.settings
        manifest = read_manifest(folder)
        if manifest is None or manifest.calibration is None:
            raise ValueError(f"{folder} has no calibration in its manifest")
        version = manifest.version or f"student-{weights_digest(folder)}"
        answers = self._answers(load_language_model(folder, device=self.device), version)
        texts = [a.text for a in answers]
        confidence = np.asarray(SCORERS[s.scorer]([a.logprobs for a in answers]), dtype=float)
        threshold = manifest.calibration.threshold(s.scorer, target_agreement=s.target_agreement)
        escalated = np.asarray(should_escalate(confidence, threshold), dtype=bool)
        agrees = rouge_l_many(texts, self.teacher_texts) >= s.agreement_cut
        student_gold = rouge_l_many(texts, self.references)
        cascade_gold = np.where(escalated, self.teacher_gold, student_gold)
        ones = np.ones(len(texts))

        def needed(rows: np.ndarray) -> float:
            return float(
                escalation_needed(confidence[rows], agrees[rows], ones[rows], s.target_agreement)[0]
            )

        return {
            "version": version,
            "threshold": threshold,
            "escalation_rate": float(escalated.mean()),
            "cascade_agreement": float(np.where(escalated, True, agrees).mean()),
            "student_agreement": float(agrees.mean()),
            "cascade_rouge_l_gold": float(cascade_gold.mean()),
            "student_rouge_l_gold": float(student_gold.mean()),
            "escalation_needed": needed(np.arange(len(texts))),
            "escalation_needed_95": bootstrap_interval(needed, len(texts)),
        }

    @property
    def teacher_rouge_l_gold(self) -> float:
        return float(self.teacher_gold.mean())
