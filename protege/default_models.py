"""Build the embedded default task once, into a cache folder (``protege models build``).

    data/            the BBC splits (split.json records how) and the task's files:
                     traffic.jsonl (unlabeled sample), gold.jsonl (holdout headlines),
                     seed.jsonl (the seed student's training headlines, replayed)
    models/teacher/  all-mpnet-base-v2 + a classification head, fine-tuned on the train split
    models/student/  all-MiniLM-L6-v2 + a mean-pooled head, trained on the small seed split
    task.yaml        the task definition; then `protege init` on it calibrates the seed,
                     fills registry/ and writes serve_config.yaml and distill.yaml
    report.json      the init report plus training figures

BBC is one task among any: the build only trains two folders and writes a task file;
everything after that is the same code path a user's own task takes. Each training stage
is skipped when its output is complete, and written to a ``.partial`` folder that is
renamed at the end, so an interrupted build resumes instead of serving half a model.
The ``lite`` profile swaps in a lighter pair (MiniLM teacher, 2-layer MiniLM student, fewer
examples) that runs the same code path in about a minute, for CI.

A build is repeatable: torch is seeded before each model is made (``from_pretrained``
initialises the classifier head from torch's global generator), the data order has its own
seeds, and the build runs on a fixed number of torch threads (the order of a sum, and so its
rounding, depends on it), so two builds on one machine give the same weights.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from distill.finetune import TrainSettings, fine_tune
from distill.prepare import prepare
from distill.tables import write_jsonl
from distill.task import TaskSpec, load_task
from protege import bbc
from protege.packages import minilm_folder, mpnet_folder
from serving.classify import meanpool
from serving.classify.classifier import pick_device
from serving.classify.onnx_runtime import Runtime


@dataclass(frozen=True)
class Profile:
    teacher_encoder: str  # "mpnet" or "minilm"
    student_layers: int
    teacher: TrainSettings
    student: TrainSettings
    train_limit: int | None  # headlines used to train the teacher (None: all)
    traffic_size: int  # texts in the task's traffic sample (scored by both models)
    target_agreement: float  # the default threshold target stored with the student
    threads: int  # torch threads for the whole build: fixed, so the weights are repeatable
    runtime: Runtime | None = None  # try serving both through this runtime (`protege optimize`)


BUILD_SEED = 0  # torch's generator before each model is made: its new head's initial weights


PROFILES = {
    "full": Profile(
        teacher_encoder="mpnet",
        student_layers=6,
        teacher=TrainSettings(epochs=3, batch_size=16, lr_encoder=3e-5, lr_head=1e-3),
        student=TrainSettings(epochs=8, batch_size=16, lr_encoder=5e-5, lr_head=2e-3),
        train_limit=None,
        traffic_size=3000,
        target_agreement=0.97,
        threads=4,
        runtime="onnx",
    ),
    "lite": Profile(
        teacher_encoder="minilm",
        student_layers=2,
        teacher=TrainSettings(epochs=1, batch_size=16, lr_encoder=5e-5, lr_head=2e-3),
        student=TrainSettings(epochs=2, batch_size=16, lr_encoder=5e-5, lr_head=2e-3),
        train_limit=240,
        traffic_size=300,
        target_agreement=0.95,
        threads=2,  # CI's machines
    ),
}


def _labels_config(config: PretrainedConfig) -> PretrainedConfig:
    config.num_labels = len(bbc.LABELS)
    config.id2label = dict(enumerate(bbc.LABELS))
    config.label2id = {label: i for i, label in enumerate(bbc.LABELS)}
    return config


@contextmanager
def fixed_threads(threads: int) -> Iterator[None]:
    """Run on ``threads`` torch threads, then restore the caller's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _base_teacher(profile: Profile, cache: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    torch.manual_seed(BUILD_SEED)  # the new head is drawn from torch's generator
    if profile.teacher_encoder == "mpnet":
        folder = mpnet_folder(cache / "encoders")
        config = _labels_config(AutoConfig.from_pretrained(folder))
        model = AutoModelForSequenceClassification.from_pretrained(folder, config=config)
    else:
        folder = minilm_folder()
        model = _mean_pool_minilm(folder, layers=6)
    return model, AutoTokenizer.from_pretrained(folder)


def _base_student(profile: Profile) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    torch.manual_seed(BUILD_SEED)
    model = _mean_pool_minilm(minilm_folder(), layers=profile.student_layers)
    return model, AutoTokenizer.from_pretrained(minilm_folder())


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
    """Build (or reuse) data, teacher, student and the task in ``cache``; returns the report."""
    profile = PROFILES[profile_name]
    dev = pick_device(device)
    data = cache / "data"
    if not (data / "split.json").exists():
        bbc.write_splits(bbc.build_splits(), data)
    teacher_dir, student_dir = cache / "models" / "teacher", cache / "models" / "student"
    report_path = cache / "report.json"
    if report_path.exists():
        return dict(json.loads(report_path.read_text()))

    # a model folder exists only once complete (it is renamed from .partial)
    training: dict[str, object] = {}
    with fixed_threads(profile.threads):
        if not teacher_dir.exists():
            model, tokenizer = _base_teacher(profile, cache)
            train = bbc.read_split(data, "train")
            train = bbc.sample(train, profile.train_limit, seed=1) if profile.train_limit else train
            training["teacher"] = _train_model(
                "teacher", teacher_dir, model, tokenizer, train, profile.teacher, dev
            )
        if not student_dir.exists():
            model, tokenizer = _base_student(profile)
            seed = bbc.read_split(data, "seed")
            training["student"] = _train_model(
                "student", student_dir, model, tokenizer, seed, profile.student, dev
            )
        task = write_task(cache, profile)
        spec = load_task(task)
        assert isinstance(spec, TaskSpec)  # the BBC task file this build writes
        prepared = prepare(spec, force=True, device=device)
    report = {**prepared.report, "training": training, "profile": profile_name}
    if profile.runtime:
        report["runtime"] = optimize_defaults(cache, profile.runtime)
    report_path.write_text(json.dumps(report, indent=1))
    return report


def optimize_defaults(cache: Path, runtime: Runtime) -> dict[str, object]:
    """Serve the seed student and the teacher through ``runtime`` where each keeps its
    decisions and is faster (`protege optimize`, on the task's traffic sample)."""
    from distill.config import load_classify_config
    from distill.optimize import optimize_student, optimize_teacher
    from distill.tables import read_texts
    from serving.classify.classifier import Classifier
    from serving.contracts.registry import Registry

    config = load_classify_config(cache / "distill.yaml")
    assert config.traffic is not None
    texts = read_texts(config.traffic)
    registry = Registry(config.registry)
    seed = registry.current()
    assert seed is not None
    teacher = Classifier(config.teacher, device="cpu", max_tokens=config.train.max_tokens)
    trials = {
        "student": optimize_student(
            registry,
            seed,
            runtime,
            texts,
            teacher,
            config.scorer,
            config.scores_dir,
        ),
        "teacher": optimize_teacher(config.teacher, runtime, texts, cache=config.scores_dir),
    }
    for role, trial in trials.items():
        verdict = "serves on" if trial.accepted else "stays on torch, refused"
        print(f"{role} {trial.version}: {verdict} {runtime}: {trial.reason}")
    return {role: asdict(trial) for role, trial in trials.items()}


def write_task(cache: Path, profile: Profile) -> Path:
    """The BBC task's files and its task.yaml (paths relative to the cache)."""
    data = cache / "data"

    def rows(examples: list[bbc.Example], labelled: bool) -> list[dict[str, str]]:
        return [
            {"text": e.text, "label": e.label} if labelled else {"text": e.text} for e in examples
        ]

    write_jsonl(
        data / "traffic.jsonl", rows(bbc.calibration_traffic(data, profile.traffic_size), False)
    )
    write_jsonl(data / "gold.jsonl", rows(bbc.read_split(data, "holdout"), True))
    write_jsonl(data / "seed.jsonl", rows(bbc.read_split(data, "seed"), True))
    task = {
        "name": "bbc-news",
        "teacher": "models/teacher",
        "student": "models/student",
        "traffic": "data/traffic.jsonl",
        "gold": "data/gold.jsonl",
        "replay_examples": "data/seed.jsonl",
        "workdir": ".",
        "target_agreement": profile.target_agreement,
        "traffic_limit": profile.traffic_size,
    }
    path = cache / "task.yaml"
    header = (
        "# The embedded default task (BBC News, 5 topics), written by `protege models build`.\n"
    )
    path.write_text(header + yaml.safe_dump(task, sort_keys=False))
    return path
