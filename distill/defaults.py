"""Build the embedded default models once, into a cache folder (``protege models build``).

    data/            the BBC splits (split.json records how)
    models/teacher/  all-mpnet-base-v2 + a classification head, fine-tuned on the train split
    models/student/  all-MiniLM-L6-v2 + a mean-pooled head, trained on the small seed split
    report.json      holdout accuracies, agreement and the calibrated threshold

Each stage is skipped when its output is complete, and written to a ``.partial`` folder
that is renamed at the end, so an interrupted build resumes instead of serving half a model.
The ``lite`` profile swaps in a lighter pair (MiniLM teacher, 2-layer MiniLM student, fewer
examples) that runs the same code path in about a minute, for CI.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill import bbc
from distill.eval_sets import calibration_set, sample
from distill.evaluate import accuracy, cascade_figures, predict_all
from distill.finetune import TrainSettings, fine_tune
from distill.packages import minilm_folder, mpnet_folder
from serving import meanpool
from serving.classifier import Classifier, pick_device
from serving.manifest import (
    Calibration,
    DefaultTarget,
    ModelManifest,
    weights_digest,
    write_manifest,
)
from serving.scoring import SCORERS


@dataclass(frozen=True)
class Profile:
    teacher_encoder: str  # "mpnet" or "minilm"
    student_layers: int
    teacher: TrainSettings
    student: TrainSettings
    train_limit: int | None  # headlines used to train the teacher (None: all)
    calibration_size: int  # sentences scored by both models to calibrate thresholds
    target_agreement: float  # the default threshold target stored with the student


PROFILES = {
    "full": Profile(
        teacher_encoder="mpnet",
        student_layers=6,
        teacher=TrainSettings(
            epochs=3, batch_size=16, lr_encoder=3e-5, lr_head=1e-3, max_tokens=64
        ),
        student=TrainSettings(
            epochs=8, batch_size=16, lr_encoder=5e-5, lr_head=2e-3, max_tokens=64
        ),
        train_limit=None,
        calibration_size=3000,
        target_agreement=0.97,
    ),
    "lite": Profile(
        teacher_encoder="minilm",
        student_layers=2,
        teacher=TrainSettings(
            epochs=1, batch_size=16, lr_encoder=5e-5, lr_head=2e-3, max_tokens=48
        ),
        student=TrainSettings(
            epochs=2, batch_size=16, lr_encoder=5e-5, lr_head=2e-3, max_tokens=48
        ),
        train_limit=240,
        calibration_size=300,
        target_agreement=0.95,
    ),
}


def _labels_config(config: PretrainedConfig) -> PretrainedConfig:
    config.num_labels = len(bbc.LABELS)
    config.id2label = dict(enumerate(bbc.LABELS))
    config.label2id = {label: i for i, label in enumerate(bbc.LABELS)}
    return config


def _base_teacher(profile: Profile, cache: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if profile.teacher_encoder == "mpnet":
        folder = mpnet_folder(cache / "encoders")
        config = _labels_config(AutoConfig.from_pretrained(folder))
        model = AutoModelForSequenceClassification.from_pretrained(folder, config=config)
    else:
        folder = minilm_folder()
        model = _mean_pool_minilm(folder, layers=6)
    return model, AutoTokenizer.from_pretrained(folder)


def _mean_pool_minilm(folder: Path, layers: int) -> PreTrainedModel:
    meanpool.register()
    config = meanpool.BertMeanPoolConfig(**BertConfig.from_pretrained(folder).to_dict())
    config.num_hidden_layers = layers  # keeps the first `layers` layers' weights
    return meanpool.BertMeanPoolForSequenceClassification.from_pretrained(
        folder, config=_labels_config(config)
    )


def _train_model(
    role: str,
    target: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[bbc.Example],
    settings: TrainSettings,
    device: torch.device,
) -> dict[str, object]:
    """Fine-tune and save to ``target`` through a .partial folder."""
    label_index = {label: i for i, label in enumerate(bbc.LABELS)}
    start = time.perf_counter()
    losses = fine_tune(
        model,
        tokenizer,
        [e.text for e in examples],
        [label_index[e.label] for e in examples],
        settings,
        device,
        desc=f"train {role}",
    )
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return {
        "examples": len(examples),
        "epoch_losses": losses,
        "seconds": round(time.perf_counter() - start, 1),
        "settings": asdict(settings),
    }


def build_defaults(
    cache: Path, profile_name: str = "full", device: str = "auto"
) -> dict[str, object]:
    """Build (or reuse) data, teacher and student in ``cache``; returns the report."""
    profile = PROFILES[profile_name]
    dev = pick_device(device)
    data = cache / "data"
    if not (data / "split.json").exists():
        bbc.write_splits(bbc.build_splits(), data)
    teacher_dir, student_dir = cache / "models" / "teacher", cache / "models" / "student"
    report_path = cache / "report.json"
    if report_path.exists() and (student_dir / "protege.json").exists():
        return dict(json.loads(report_path.read_text()))

    # a model folder exists only once complete (it is renamed from .partial)
    training: dict[str, object] = {}
    if not (teacher_dir / "protege.json").exists():
        model, tokenizer = _base_teacher(profile, cache)
        train = bbc.read_split(data, "train")
        train = sample(train, profile.train_limit, seed=1) if profile.train_limit else train
        training["teacher"] = _train_model(
            "teacher", teacher_dir, model, tokenizer, train, profile.teacher, dev
        )
        _write_plain_manifest(teacher_dir, "teacher")
    if not student_dir.exists():
        model = _mean_pool_minilm(minilm_folder(), layers=profile.student_layers)
        tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
        seed = bbc.read_split(data, "seed")
        training["student"] = _train_model(
            "student", student_dir, model, tokenizer, seed, profile.student, dev
        )
    report = _evaluate_and_calibrate(data, teacher_dir, student_dir, profile, device)
    report["training"] = training
    report["profile"] = profile_name
    report_path.write_text(json.dumps(report, indent=1))
    return report


def _write_plain_manifest(folder: Path, role: str) -> None:
    write_manifest(
        folder,
        ModelManifest(
            version=f"{role}-{weights_digest(folder)}",
            role=role,
            created_at=time.time(),
            labels=bbc.LABELS,
        ),
    )


def _evaluate_and_calibrate(
    data: Path, teacher_dir: Path, student_dir: Path, profile: Profile, device: str
) -> dict[str, object]:
    """Score both models through the serving loader; store the student's calibration."""
    teacher, student = Classifier(teacher_dir, device), Classifier(student_dir, device)
    holdout = bbc.read_split(data, "holdout")
    calibration = calibration_set(data, profile.calibration_size)
    headlines = [e for e in calibration if e.kind == "headline"]
    gold = np.array([bbc.LABELS.index(e.label) for e in holdout])
    hold_t = predict_all(teacher, [e.text for e in holdout], desc="teacher: holdout")
    hold_s = predict_all(student, [e.text for e in holdout], desc="student: holdout")
    cal_t = predict_all(teacher, [e.text for e in calibration], desc="teacher: calibration")
    cal_s = predict_all(student, [e.text for e in calibration], desc="student: calibration")
    cal = Calibration(
        source=f"{len(calibration)} BBC inputs ({len(headlines)} train headlines, the rest sentences)",
        confidences={
            name: [round(float(c), 6) for c in scorer(cal_s)] for name, scorer in SCORERS.items()
        },
        agrees_with_teacher=(cal_s.argmax(1) == cal_t.argmax(1)).tolist(),
    )
    threshold = cal.threshold("max_prob", target_agreement=profile.target_agreement)
    cascade = cascade_figures(hold_s, hold_t, SCORERS["max_prob"](hold_s), threshold, gold)
    figures = {
        "holdout_headlines": len(holdout),
        "teacher_accuracy": accuracy(hold_t, gold),
        "student_accuracy": accuracy(hold_s, gold),
        "student_teacher_agreement": float((hold_s.argmax(1) == hold_t.argmax(1)).mean()),
        "calibration_inputs": len(calibration),
        "calibration_agreement": float(np.mean(cal.agrees_with_teacher)),
        "target_agreement": profile.target_agreement,
        "threshold_max_prob": threshold,
        "cascade_escalation_rate": cascade.escalation_rate,
        "cascade_accuracy": cascade.accuracy,
        "oracle_escalation_rate": float((hold_s.argmax(1) != gold).mean()),
    }
    write_manifest(
        student_dir,
        ModelManifest(
            version=f"student-{weights_digest(student_dir)}",
            role="student",
            created_at=time.time(),
            labels=bbc.LABELS,
            default_target=DefaultTarget(target_agreement=profile.target_agreement),
            calibration=cal,
            eval={k: float(v) for k, v in figures.items()},
        ),
    )
    return {
        "teacher": read_version(teacher_dir),
        "student": read_version(student_dir),
        "holdout": figures,
    }


def read_version(folder: Path) -> str:
    return str(json.loads((folder / "protege.json").read_text())["version"])
