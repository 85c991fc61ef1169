"""Loading a generative student for the slot: load, validate with a warm-up generation,
calibrate.

The slot (:class:`serving.hot_swap.StudentSlot`) and the pointer follower swap a
generative student exactly as a classifier: by the registry's pointer, loaded off the
request path, one reference replaced. What the slot needs of a model (``version``,
``manifest``, ``folder``) :class:`GenerativeStudent` has; the rest is what the generation
service reads per request (the language model, its limits, the draft rule's cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.contracts.manifest import ModelManifest, read_manifest, weights_digest
from serving.contracts.threshold import resolve_threshold
from serving.generate.config import GenerateCascadeConfig, resolve_limits
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import LanguageModel, load_language_model, render_completion
from serving.generate.teacher_engine import tokenizer_digest
from serving.hot_swap import ActiveStudent

WARM_UP_PROMPTS = ("warm-up input", "a second, longer warm-up input for the batch")
WARM_UP_TOKENS = 4


@dataclass(frozen=True)
class GenerativeStudent:
    """One loaded student version and what it is served with."""

    lm: LanguageModel
    version: str
    manifest: ModelManifest | None
    folder: Path
    max_prompt_tokens: int
    max_new_tokens: int
    draft_min_confidence: float | None  # the draft rule's cut (None: always verify)
    tokenizer_digest: str


def window(lm: LanguageModel) -> int | None:
    """The positions the model can attend over (None when its config does not say)."""
    value = getattr(lm.model.config, "max_position_embeddings", None)
    return int(value) if value else None


def open_student(folder: Path, config: GenerateCascadeConfig, device: str) -> GenerativeStudent:
    """Load and validate one generative student version; raises with the reason if unfit."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.kind != "generate":
        raise ValueError(
            f"version {manifest.version} is a {manifest.kind} model, not a generative one"
        )
    lm = load_language_model(folder, device=device)
    max_prompt, max_new = resolve_limits(config, manifest, window(lm))
    student = GenerativeStudent(
        lm=lm,
        version=manifest.version if manifest else weights_digest(folder),
        manifest=manifest,
        folder=folder,
        max_prompt_tokens=max_prompt,
        max_new_tokens=max_new,
        draft_min_confidence=manifest.draft_min_confidence if manifest else None,
        tokenizer_digest=tokenizer_digest(lm.tokenizer),
    )
    warm_up(student)
    return student


def warm_up(student: GenerativeStudent) -> None:
    """A short batched generation: it must run and give finite log-probabilities."""
    prompts = [render_completion(student.lm.tokenizer, text) for text in WARM_UP_PROMPTS]
    settings = SamplingSettings(max_new_tokens=min(WARM_UP_TOKENS, student.max_new_tokens))
    answers = generate_batch(student.lm, prompts, settings)
    if len(answers) != len(prompts):
        raise ValueError(f"warm-up produced {len(answers)} answers for {len(prompts)} prompts")
    for answer in answers:
        if any(not (math.isfinite(v) and v <= 1e-6) for v in answer.logprobs):
            raise ValueError(
                f"warm-up log-probabilities are not finite and <= 0: {answer.logprobs}"
            )


def load_student(
    folder: Path,
    cascade: Any,
    device: str,
    max_tokens: int | None = None,
    labels: list[str] | None = None,
) -> ActiveStudent:
    """The slot's loader (:data:`serving.hot_swap.Loader`): ``cascade`` is the generative
    cascade's config (with the slot's threshold override applied); ``max_tokens`` and
    ``labels`` are the classification kind's and are ignored here."""
    if not isinstance(cascade, GenerateCascadeConfig):
        raise TypeError(f"a generative student needs a GenerateCascadeConfig, got {type(cascade)}")
    student = open_student(folder, cascade, device)
    return ActiveStudent(student, resolve_threshold(cascade, student.manifest))
