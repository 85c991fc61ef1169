"""One distillation run: window -> train a candidate -> evaluate both -> gate -> publish.

    protege distill run --config deploy/distill.yaml

Nothing is half-published: the candidate is built in the registry's staging folder and
moved in whole; the current pointer moves last; a crash anywhere leaves the old current.
The run report (registry/runs/<run id>.json) says what happened and why.
"""

from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill import bbc, metrics
from distill.config import DistillConfig
from distill.dataset import Window, read_watermark, read_window, write_watermark
from distill.eval_sets import cached_probs, calibration_set, gold, holdout_set
from distill.finetune import TrainSettings, fine_tune
from distill.gate import ModelEval, evaluate, gate, make_calibration
from distill.lock import run_lock
from serving import meanpool
from serving.classifier import Classifier, pick_device
from serving.manifest import (
    Calibration,
    DefaultTarget,
    ModelManifest,
    weights_digest,
    write_manifest,
)
from serving.registry import Registry, RegistryError


def run(config: DistillConfig) -> dict[str, Any]:
    """Run once; returns the run report (also written to the registry)."""
    registry = Registry(config.registry)
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    began = time.time()
    with run_lock(registry.root / "distill.lock"):
        try:
            report = _run_locked(config, registry, run_id)
        except Exception as exc:
            failed = {
                "run_id": run_id,
                "result": "failed",
                "reason": f"{type(exc).__name__}: {exc}",
                "seconds": round(time.time() - began, 1),
            }
            registry.write_run(run_id, failed)
            metrics.push(
                config.pushgateway,
                failed,
                registry.runs_dir,
                metrics.last_success(registry.runs_dir),
            )
            raise
    report = {"run_id": run_id, **report, "seconds": round(time.time() - began, 1)}
    registry.write_run(run_id, report)
    metrics.push(
        config.pushgateway, report, registry.runs_dir, metrics.last_success(registry.runs_dir)
    )
    return report


def _run_locked(config: DistillConfig, registry: Registry, run_id: str) -> dict[str, Any]:
    current = registry.current()
    if current is None:
        raise RegistryError(
            f"registry {registry.root} has no current student: "
            "`protege registry import var/cache/models/student --promote` first"
        )
    holdout = holdout_set(config.data_dir, config.holdout_sentences)
    watermark = read_watermark(registry.root)
    window = read_window(
        config.log_dir,
        watermark,
        exclude_texts={e.text for e in holdout},
        replay=config.replay.earlier_records,
        seed=config.train.seed + len(watermark),
    )
    if len(window.new) < config.min_records:
        return {
            "result": "nothing-to-do",
            "reason": f"{len(window.new)} new records, fewer than min_records={config.min_records}",
            "current": current,
            "window": window.describe(),
        }
    teacher = Classifier(config.teacher, device=config.device)
    cache = config.data_dir / "scores"
    texts, soft, labels = _training_set(config, window, teacher, cache)
    staged, losses = _train_candidate(config, registry, current, texts, soft, labels, run_id)
    try:
        return _judge_and_publish(
            config, registry, current, teacher, holdout, cache, staged, window, losses, len(texts)
        )
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _training_set(
    config: DistillConfig, window: Window, teacher: Classifier, cache: Path
) -> tuple[list[str], list[list[float]], list[int]]:
    """Soft targets from the logged teacher distributions; labels are gold where a record
    has one, else the teacher's. The seed headlines are replayed with their gold labels."""
    records = window.new + window.replay
    texts = [r.text for r in records]
    soft = [r.teacher_probs for r in records]
    labels = [r.labels.index(r.gold_label or r.teacher_label) for r in records]
    if config.replay.seed_examples:
        seed = bbc.read_split(config.data_dir, "seed")
        probs = cached_probs(teacher, seed, cache, "seed")
        texts += [e.text for e in seed]
        soft += probs.tolist()
        labels += gold(seed).tolist()
    return texts, soft, labels


def _train_candidate(
    config: DistillConfig,
    registry: Registry,
    current: str,
    texts: list[str],
    soft: list[list[float]],
    labels: list[int],
    run_id: str,
) -> tuple[Path, list[float]]:
    """Fine-tune a copy of the current student; returns its staging folder and losses."""
    meanpool.register()
    source = registry.path(current)
    model = AutoModelForSequenceClassification.from_pretrained(source, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    t = config.train
    settings = TrainSettings(**t.model_dump(exclude={"workers"}), **config.loss.model_dump())
    if t.workers > 1:
        from distill.ray_train import train_with_ray

        losses = train_with_ray(model, tokenizer, texts, labels, soft, settings, t.workers)
    else:
        losses = fine_tune(
            model,
            tokenizer,
            texts,
            labels,
            settings,
            pick_device(config.device),
            desc=f"distil {current}",
            soft_targets=soft,
        )
    staged = registry.root / "staging" / run_id
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    return staged, losses


def _judge_and_publish(
    config: DistillConfig,
    registry: Registry,
    current: str,
    teacher: Classifier,
    holdout: list[bbc.Example],
    cache: Path,
    staged: Path,
    window: Window,
    losses: list[float],
    examples: int,
) -> dict[str, Any]:
    candidate = f"student-{weights_digest(staged)}"
    training = {
        "window": window.describe(),
        "examples": examples,
        "epoch_losses": losses,
        "loss": config.loss.model_dump(),
        "train": config.train.model_dump(),
        "watermark": window.watermark,
    }
    manifest = ModelManifest(  # written before judging: the score cache is keyed by version
        version=candidate,
        role="student",
        parent=current,
        created_at=time.time(),
        labels=bbc.LABELS,
        default_target=DefaultTarget(target_agreement=config.gate.target_agreement),
        training=training,
    )
    write_manifest(staged, manifest)
    judge = _Judge(config, teacher, holdout, cache)
    current_eval, _ = judge(registry.path(current))
    candidate_eval, calibration = judge(staged)
    promote, why = gate(candidate_eval, current_eval, config.gate)
    if promote:
        eval_figures = {k: v for k, v in candidate_eval.as_dict().items() if isinstance(v, float)}
        write_manifest(
            staged, manifest.model_copy(update={"calibration": calibration, "eval": eval_figures})
        )
        registry.publish(staged)
        registry.promote(candidate)
    write_watermark(registry.root, window.watermark)  # consumed, promoted or not
    return {
        "result": "promoted" if promote else "rejected",
        "reason": why,
        "current": current,
        "candidate": candidate,
        "window": window.describe(),
        "training_examples": examples,
        "epoch_losses": losses,
        "eval": {"current": current_eval.as_dict(), "candidate": candidate_eval.as_dict()},
        "holdout_inputs": len(holdout),
    }


class _Judge:
    """Scores a student version on the fixed calibration and holdout traffic (cached per
    version) and evaluates it as it would serve, at its own calibrated threshold."""

    def __init__(
        self, config: DistillConfig, teacher: Classifier, holdout: list[bbc.Example], cache: Path
    ) -> None:
        self.config, self.holdout, self.cache = config, holdout, cache
        self.calibration = calibration_set(config.data_dir, config.calibration_size)
        self.cal_teacher = cached_probs(teacher, self.calibration, cache, "calibration")
        self.hold_teacher = cached_probs(teacher, holdout, cache, "holdout")
        self.gold_rows = np.array([e.kind == "headline" for e in holdout])
        self.gold = gold([e for e in holdout if e.kind == "headline"])

    def __call__(self, folder: Path) -> tuple[ModelEval, Calibration]:
        student = Classifier(folder, device=self.config.device)
        headlines = sum(e.kind == "headline" for e in self.calibration)
        calibration = make_calibration(
            cached_probs(student, self.calibration, self.cache, "calibration"),
            self.cal_teacher,
            f"{len(self.calibration)} BBC inputs ({headlines} headlines, the rest sentences)",
        )
        probs = cached_probs(student, self.holdout, self.cache, "holdout")
        figures = evaluate(
            student.version,
            calibration,
            probs,
            self.hold_teacher,
            self.gold,
            self.gold_rows,
            self.config.gate.target_agreement,
        )
        return figures, calibration
