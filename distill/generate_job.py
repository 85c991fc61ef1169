"""One distillation run of a generative cascade: window -> train a candidate -> judge
both on greedy answers -> gate -> publish.

    protege distill run --config <workdir>/distill.yaml     # kind: generate

The same run as a classification one (:mod:`distill.job`): the same lease, registry,
watermark, evidence checks and gate; only the kind's parts differ: the training pairs
(the teacher's logged answers, or generated offline; token- or sequence-level, see
:mod:`distill.generation_examples`), the causal-LM training loop
(:func:`distill.causal_lm.train_causal_lm` with :func:`distill.token_kd.token_distillation_loss`),
and the judge (:mod:`distill.generate_judge`). Generating offline is the run's largest
cost; the report gives its count and seconds.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill import gate
from distill.causal_lm import (
    CausalExample,
    CausalTrainSettings,
    answer_cross_entropy,
    train_causal_lm,
)
from distill.dataset import read_generation_window
from distill.generate_config import GenerateDistillConfig
from distill.generate_judge import GenerateJudge, JudgeSettings
from distill.generation_examples import training_examples
from distill.job import (
    decision_result,
    flat_figures,
    lease_lost,
    open_window,
    run_under_lease,
    window_stop,
)
from distill.lock import Lease
from distill.offline_answers import OfflineAnswers
from distill.prompts import TaskPrompt, read_prompts
from distill.splits import normalise
from distill.token_kd import token_distillation_loss
from serving.contracts.generation_records import GenerationRecord
from serving.contracts.manifest import (
    DefaultTarget,
    ModelManifest,
    read_manifest,
    weights_digest,
    write_manifest,
)
from serving.contracts.registry import Registry
from serving.generate.models import load_language_model, load_tokenizer, tokenizer_differences

Trainer = Callable[[Path, Sequence[CausalExample], Path], list[float]]
"""(current student's folder, training pairs, where to save the candidate) -> epoch losses."""


def run_generate(config: GenerateDistillConfig, trainer: Trainer | None = None) -> dict[str, Any]:
    """Run once; returns the run report (also written to the registry). ``trainer``
    replaces the training loop (a test seam: a planted candidate)."""

    def locked(registry: Registry, run_id: str, lease: Lease) -> dict[str, Any]:
        return _run_locked(config, registry, run_id, lease, trainer or _trainer(config, registry))

    return run_under_lease(config, locked, kind="generate")


def _run_locked(
    config: GenerateDistillConfig, registry: Registry, run_id: str, lease: Lease, trainer: Trainer
) -> dict[str, Any]:
    current, window = open_window(
        config,
        registry,
        read_generation_window,
        config.replay_records,
        "run `protege init TASK.yaml` on the generative task first",
    )
    stop = window_stop(
        window,
        current,
        config.min_records,
        config.gate.min_sampled,
        "sampled kept answers",
        "generate.audit_fraction",
    )
    if stop is not None:
        return stop
    teacher_lm = load_language_model(config.teacher, device=config.device)
    student_folder = registry.path(current)
    student_tokenizer = load_tokenizer(student_folder)
    differences = tokenizer_differences(student_tokenizer, teacher_lm.tokenizer)
    if config.distillation == "token" and differences:
        raise ValueError(
            f"the student's and the teacher's tokenizers differ ({', '.join(differences)}), "
            "and token-level distillation needs one tokenizer: set `distillation: sequence`"
        )
    offline = OfflineAnswers(
        teacher_lm, teacher_version(config), config.scores_dir, config.top_k, config.batch_size
    )
    gold = sample_prompts(config.gold, reference=True, limit=config.gold_limit)
    held_out = {normalise(p.split_text) for p in gold}
    records = [r for r in window.new + window.replay if normalise(r.split_text) not in held_out]
    began = time.perf_counter()
    answers = offline.answers(records)
    examples = training_examples(records, answers, student_tokenizer, config.distillation)
    if not examples:
        raise ValueError("no training pairs: every teacher answer was empty")
    staged = registry.staging_dir() / run_id
    shutil.rmtree(staged, ignore_errors=True)
    training_began = time.perf_counter()
    losses = trainer(student_folder, examples, staged)
    training_seconds = time.perf_counter() - training_began
    try:
        if not lease.renew():
            return lease_lost(current)
        report = _judge_and_publish(
            config, registry, current, offline, staged, window, records, gold, lease
        )
        report["training"] = {
            "examples": len(examples),
            "top_k_examples": sum(getattr(e, "top_ids", None) is not None for e in examples),
            "epoch_losses": losses,
            "seconds": round(training_seconds, 1),
        }
        report["offline_generation"] = {
            "teacher_answers": offline.asked,
            "teacher_seconds": round(offline.seconds, 1),
            "answers_of_another_teacher_version": offline.foreign(records),
            **report.pop("judge_cost"),
            "training_set_seconds": round(training_began - began, 1),
        }
        return report
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def teacher_version(config: GenerateDistillConfig) -> str:
    """The version the teacher's answers are kept under: the one the gateway logs them
    under (``teacher_version``), else the folder's own."""
    if config.teacher_version:
        return config.teacher_version
    manifest = read_manifest(config.teacher)
    return manifest.version if manifest else f"teacher-{weights_digest(config.teacher)}"


def _trainer(config: GenerateDistillConfig, registry: Registry) -> Trainer:
    """The causal-LM training loop with the configured loss: in process for one worker,
    under Ray Train for several (on one node or several)."""

    def train(current: Path, examples: Sequence[CausalExample], staged: Path) -> list[float]:
        t = config.train
        settings = CausalTrainSettings(
            epochs=t.epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            weight_decay=t.weight_decay,
            warmup_fraction=t.warmup_fraction,
            train_embeddings=t.train_embeddings,
            seed=t.seed,
        )
        token = config.distillation == "token"
        if t.workers > 1:
            from distill.ray_train import train_causal_with_ray

            lm = load_language_model(current, device="cpu")
            storage = t.storage_path or (
                f"{registry.uri}/train-runs"
                if registry.local is None
                else str((registry.local / "train-runs").resolve())
            )
            spec = (
                ("token", config.loss.alpha, config.loss.temperature)
                if token
                else (
                    "sequence",
                    0.0,
                    0.0,
                )
            )
            losses, _ = train_causal_with_ray(
                lm.model,
                lm.tokenizer,
                examples,
                settings,
                spec,
                t.workers,
                storage,
                config.s3_endpoint,
                t.placement_strategy,
            )
        else:
            lm = load_language_model(current, device=config.device)
            loss = (
                token_distillation_loss(config.loss.alpha, config.loss.temperature)
                if token
                else answer_cross_entropy
            )
            losses = train_causal_lm(
                lm.model, examples, settings, lm.pad_token_id, loss_fn=loss, desc="distil"
            )
        lm.model.save_pretrained(staged)
        lm.tokenizer.save_pretrained(staged)
        return losses

    return train


def _judge_and_publish(
    config: GenerateDistillConfig,
    registry: Registry,
    current: str,
    offline: OfflineAnswers,
    staged: Path,
    window: Any,
    records: list[GenerationRecord],
    gold: list[TaskPrompt],
    lease: Lease,
) -> dict[str, Any]:
    candidate = f"student-{weights_digest(staged)}"
    parent = registry.manifest(current)
    manifest = ModelManifest(  # written before judging: answers are kept by version
        version=candidate,
        role="student",
        parent=current,
        created_at=time.time(),
        kind="generate",
        agreement_cut=config.agreement_cut,
        max_prompt_tokens=parent.max_prompt_tokens or config.max_prompt_tokens,
        max_new_tokens=parent.max_new_tokens or config.max_new_tokens,
        draft_min_confidence=parent.draft_min_confidence,
        default_target=DefaultTarget(target_agreement=config.gate.target_agreement),
        training={
            "window": window.describe(),
            "distillation": config.distillation,
            "loss": config.loss.model_dump(),
            "train": config.train.model_dump(),
            "watermark": window.watermark,
        },
    )
    write_manifest(staged, manifest)
    trained_on = {normalise(r.split_text) for r in records} | window.consumed_texts
    settings = JudgeSettings(
        scorer=config.scorer,
        agreement_cut=config.agreement_cut,
        target_agreement=config.gate.target_agreement,
        min_calibration_sampled=config.eval.min_calibration_sampled,
        max_new_tokens=manifest.max_new_tokens or config.max_new_tokens,
        batch_size=config.batch_size,
    )
    began = time.perf_counter()
    judge = GenerateJudge(
        settings,
        offline,
        window,
        config.scores_dir,
        traffic=sample_prompts(config.traffic, reference=False, limit=config.traffic_limit),
        gold=gold,
        trained_on=trained_on,
        device=config.device,
    )
    current_judged, _ = judge(registry.path(current))
    candidate_judged, calibration = judge(staged)
    judge_cost = {
        "judge_seconds": round(time.perf_counter() - began, 1),
        "judge_teacher_seconds": round(judge.teacher_seconds, 1),
        "student_answers": {v: c.asked for v, c in judge.students.items()},
        "student_seconds": {v: round(c.seconds, 1) for v, c in judge.students.items()},
    }
    decision = gate.decide(
        current_judged, candidate_judged, judge.gate_set, config.gate, judge.teacher_gold
    )
    figures = decision.as_dict()
    if decision.candidate is None:
        return {
            "result": "not-enough-evidence",
            "reason": decision.reason,
            "current": current,
            "candidate": candidate,
            "window": window.describe(),
            "judge_cost": judge_cost,
        }
    flat = {name: flat_figures(figures.get(name)) for name in ("current", "candidate")}
    if not lease.renew():
        return {**lease_lost(current), "judge_cost": judge_cost}
    if decision.promote:
        evaluated = {k: v for k, v in flat["candidate"].items() if isinstance(v, float)}
        write_manifest(
            staged, manifest.model_copy(update={"calibration": calibration, "eval": evaluated})
        )
        registry.publish(staged)
    result, reason = decision_result(registry, decision, candidate, current, lease, window)
    return {
        "result": result,
        "reason": reason,
        "current": current,
        "candidate": candidate,
        "window": window.describe(),
        "eval": {k: v for k, v in flat.items() if v},
        "decision": figures,
        "calibration": {
            "kind": calibration.kind,
            "source": calibration.source,
            "inputs": len(calibration.agrees_with_teacher),
            "trained_prompts_dropped": judge.traffic_dropped,
        },
        "teacher_likelihood": {
            "current": judge.likelihood.get(current),
            "candidate": judge.likelihood.get(candidate),
            "what": "mean log-likelihood per token of the teacher's greedy answers to the "
            "gate records, under each student",
        },
        "judge_cost": judge_cost,
    }


def sample_prompts(path: Path | None, *, reference: bool, limit: int) -> list[TaskPrompt]:
    """The file's prompts, a seeded sample of ``limit`` when it holds more (the same
    sample every run, so answers kept per version are reused)."""
    if path is None:
        return []
    prompts = read_prompts(path, reference_column="reference" if reference else None)
    return prompts if len(prompts) <= limit else random.Random(0).sample(prompts, limit)
