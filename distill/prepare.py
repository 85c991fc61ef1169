"""``protege init TASK.yaml``: check a teacher/student pair and make a task ready to serve.

1. the pair: both folders load, hold safetensors weights and a tokenizer, and the student
   has the teacher's labels in the same order (each failure names the folder and the fix);
2. the traffic sample (and gold file) read and checked against those labels;
3. both models score the traffic sample; the seed student's manifest gets the calibration
   (every scorer) so any target can be turned into a threshold for exactly that version;
4. ``<workdir>/models/{teacher,student}`` (hard links where possible, plus protege.json),
   the seed student imported and made current in the task's registry, and
   ``<workdir>/serve_config.yaml`` and ``<workdir>/distill.yaml`` written from the task.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from transformers import AutoConfig, AutoTokenizer

from distill.eval_sets import cached_probs
from distill.evaluate import accuracy
from distill.gate import make_calibration
from distill.tables import read_labelled, read_texts, write_jsonl
from distill.task import TaskError, TaskSpec
from serving.classify import meanpool
from serving.classify.classifier import Classifier
from serving.classify.scorers import SCORERS
from serving.contracts.manifest import DefaultTarget, ModelManifest, weights_digest, write_manifest
from serving.contracts.registry import Registry
from serving.contracts.threshold import should_escalate, threshold_for_agreement

TABLE_TARGETS = (0.90, 0.95, 0.97, 0.98, 0.99, 1.0)


def model_labels(folder: Path, role: str) -> list[str]:
    """The labels of a model folder, after checking it is one protege can load."""
    if not folder.is_dir():
        raise TaskError(f"{role} {folder}: folder not found")
    if not (folder / "config.json").is_file():
        raise TaskError(f"{role} {folder}: no config.json; save it with save_pretrained()")
    if not list(folder.glob("*.safetensors")):
        raise TaskError(
            f"{role} {folder}: no *.safetensors weights (protege loads only safetensors); "
            "re-save with model.save_pretrained(folder, safe_serialization=True)"
        )
    meanpool.register()
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise TaskError(f"{role} {folder}/config.json cannot be read: {exc}") from None
    saved = [n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).is_file()]
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder) if saved else None
    except Exception:
        tokenizer = None
    if tokenizer is None or len(tokenizer) < 0.5 * config.vocab_size:
        raise TaskError(
            f"{role} {folder}: no tokenizer that loads and matches the model's vocabulary; "
            "save it beside the model with tokenizer.save_pretrained(folder)"
        )
    return [config.id2label[i] for i in range(config.num_labels)]


def check_pair(spec: TaskSpec) -> list[str]:
    """The task's labels (the teacher's), once the student is shown to share them."""
    teacher = model_labels(spec.teacher, "teacher")
    student = model_labels(spec.student, "student")
    if student != teacher:
        raise TaskError(
            f"student {spec.student}: labels {student} differ from the teacher's {teacher}; "
            "set the student's id2label/label2id to the teacher's, in the same order"
        )
    return teacher


@dataclass(frozen=True)
class Prepared:
    labels: list[str]
    teacher: Path
    student: Path
    student_version: str
    report: dict[str, Any]


def prepare(spec: TaskSpec, *, force: bool = False, device: str = "auto") -> Prepared:
    labels = check_pair(spec)
    texts = read_texts(spec.traffic, spec.text_column)
    if len(texts) > spec.traffic_limit:
        texts = random.Random(0).sample(texts, spec.traffic_limit)
    gold = None
    if spec.gold is not None:
        gold = read_labelled(spec.gold, labels, spec.text_column, spec.label_column)
    if spec.replay_examples is not None:
        replay = read_labelled(spec.replay_examples, labels, spec.text_column, spec.label_column)
    registry = Registry(spec.registry_dir)
    current = registry.current()
    student_version = f"student-{weights_digest(spec.student)}"
    if current is not None and current != student_version and not force:
        raise TaskError(
            f"registry {registry.root} already serves {current}; pass --force to make the "
            "seed student current again, or set another registry in the task file"
        )
    spec.work.mkdir(parents=True, exist_ok=True)
    # normalised copies: the distillation job reads `text` (and `label`) columns only
    write_jsonl(spec.work / "traffic.jsonl", [{"text": t} for t in texts])
    if gold is not None:
        write_jsonl(spec.work / "gold.jsonl", _labelled_rows(*gold, labels))
    if spec.replay_examples is not None:
        write_jsonl(spec.work / "replay.jsonl", _labelled_rows(*replay, labels))
    models = spec.work / "models"
    teacher_dir = materialise(spec.teacher, models / "teacher")
    teacher_version = _plain_manifest(teacher_dir, "teacher", labels, spec.max_tokens)
    student_dir = materialise(spec.student, models / "student")

    cache = spec.work / "cache"
    teacher = Classifier(teacher_dir, device=device, max_tokens=spec.max_tokens)
    t_probs = cached_probs(teacher, texts, cache, "traffic")
    _plain_manifest(
        student_dir, "student", labels, spec.max_tokens
    )  # scored under its final version id
    student = Classifier(student_dir, device=device, max_tokens=spec.max_tokens)
    s_probs = cached_probs(student, texts, cache, "traffic")
    calibration = make_calibration(
        s_probs,
        t_probs.argmax(1),
        f"{len(texts)} texts of the task's traffic ({spec.traffic.name})",
    )
    figures: dict[str, float] = {
        "traffic_texts": len(texts),
        "student_teacher_agreement": float(np.mean(calibration.agrees_with_teacher)),
    }
    if gold is not None:
        gold_texts, gold_labels = gold
        figures["gold_texts"] = len(gold_texts)
        figures["teacher_gold_accuracy"] = accuracy(
            cached_probs(teacher, gold_texts, cache, "gold"), np.array(gold_labels)
        )
        figures["student_gold_accuracy"] = accuracy(
            cached_probs(student, gold_texts, cache, "gold"), np.array(gold_labels)
        )
    threshold = calibration.threshold(spec.scorer, target_agreement=spec.target_agreement)
    figures["threshold"] = threshold
    figures["escalation_rate"] = float(
        np.mean(should_escalate(np.asarray(calibration.confidences[spec.scorer]), threshold))
    )
    manifest = ModelManifest(
        version=student_version,
        role="student",
        created_at=time.time(),
        labels=labels,
        max_tokens=spec.max_tokens,
        default_target=DefaultTarget(target_agreement=spec.target_agreement),
        calibration=calibration,
        eval=figures,
        training={"seed": str(spec.student), "task": spec.name},
    )
    write_manifest(student_dir, manifest)
    registry.import_folder(student_dir)
    registry.promote(student_version)
    table = scorer_table(s_probs, t_probs.argmax(1))
    _write_configs(spec, teacher_dir, student_dir, labels)
    report = {
        "task": spec.name,
        "labels": labels,
        "teacher": teacher_version,
        "student": student_version,
        "figures": figures,
        "escalation_by_target": table,
        "registry": str(registry.root),
        "serve_config": str(spec.work / "serve_config.yaml"),
        "distill_config": str(spec.work / "distill.yaml"),
    }
    (spec.work / "init_report.json").write_text(json.dumps(report, indent=1))
    return Prepared(labels, teacher_dir, student_dir, student_version, report)


def scorer_table(student: np.ndarray, teacher_labels: np.ndarray) -> dict[str, dict[str, float]]:
    """For each target agreement with the teacher, the escalation rate each scorer needs
    on the traffic sample: what a target costs."""
    agrees = student.argmax(1) == teacher_labels
    table: dict[str, dict[str, float]] = {}
    for target in TABLE_TARGETS:
        row = {}
        for name, scorer in SCORERS.items():
            confidence = scorer(student)
            threshold = threshold_for_agreement(confidence, agrees, target)
            row[name] = float(np.mean(should_escalate(confidence, threshold)))
        table[f"{target:.2f}"] = row
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    names = list(next(iter(table.values())))
    head = f"{'target agreement':>16} | " + " | ".join(f"{n:>11}" for n in names)
    lines = [head, "-" * len(head)]
    for target, row in table.items():
        cells = " | ".join(f"{row[n]:>11.1%}" for n in names)
        lines.append(f"{float(target):>16.0%} | {cells}")
    return "\n".join(lines)


def _labelled_rows(texts: list[str], indices: list[int], labels: list[str]) -> list[dict[str, str]]:
    return [{"text": t, "label": labels[i]} for t, i in zip(texts, indices, strict=True)]


def materialise(source: Path, target: Path) -> Path:
    """A folder of the source's files (hard links where the file system allows) that
    protege may add its manifest to without touching the user's folder."""
    if target.resolve() == source.resolve():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial, copy_function=_link_or_copy, ignore=_skip_manifest)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _skip_manifest(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "protege.json"]


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _plain_manifest(folder: Path, role: str, labels: list[str], max_tokens: int) -> str:
    version = f"{role}-{weights_digest(folder)}"
    manifest = ModelManifest(
        version=version, role=role, created_at=time.time(), labels=labels, max_tokens=max_tokens
    )
    write_manifest(folder, manifest)
    return version


def local_serve_config(args: dict[str, Any], teacher_deployment: str) -> dict[str, Any]:
    """A Serve config of one gateway on 127.0.0.1:8000 with ``args`` (a cascade's) and one
    replica each of the Gateway and the teacher deployment, open to anyone on this machine
    until a key is configured."""
    one_replica = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "protege",
                "route_prefix": "/",
                "import_path": "serving.app:build_app",
                "args": {
                    **args,
                    # open on 127.0.0.1 while no key is configured: set access.keys_file
                    # (`protege keys new NAME --file ...`) before serving anyone else
                    "access": {"required": False},
                },
                "deployments": [
                    {"name": "Gateway", **one_replica},
                    {"name": teacher_deployment, **one_replica},
                ],
            }
        ],
    }


def _write_configs(spec: TaskSpec, teacher: Path, student: Path, labels: list[str]) -> None:
    """The task's Serve config and distillation config, every path spelled out (absolute,
    so they work from any folder)."""
    teacher, student = teacher.resolve(), student.resolve()
    work = spec.work.resolve()
    cascade = {
        "student": {"path": str(student), "max_tokens": spec.max_tokens},
        "teacher": {"path": str(teacher), "max_tokens": spec.max_tokens},
        "registry": str(spec.registry_dir.resolve()),
        "cascade": {"scorer": spec.scorer, "audit_fraction": spec.audit_fraction},
        "log": {"dir": str(spec.escalations_dir.resolve())},
    }
    serve = local_serve_config(cascade, "Teacher")
    distill: dict[str, Any] = {
        "registry": str(spec.registry_dir.resolve()),
        "log_dir": str(spec.escalations_dir.resolve()),
        "teacher": str(teacher),
        "traffic": str(work / "traffic.jsonl"),
        "cache_dir": str(work / "cache"),  # init's scores: the traffic is scored once
        "scorer": spec.scorer,
        "train": {"max_tokens": spec.max_tokens},
        "gate": {"target_agreement": spec.target_agreement},
    }
    if spec.gold is not None:
        distill["gold"] = str(work / "gold.jsonl")
    if spec.replay_examples is not None:
        distill["replay"] = {"examples": str(work / "replay.jsonl")}
    header = f"# Written by `protege init` for task {spec.name!r} (labels: {', '.join(labels)}).\n"
    for name, content in (("serve_config.yaml", serve), ("distill.yaml", distill)):
        (work / name).write_text(header + yaml.safe_dump(content, sort_keys=False))
