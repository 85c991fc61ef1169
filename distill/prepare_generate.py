"""``protege init TASK.yaml`` for ``kind: generate``: check a causal-LM pair and make the
task ready to serve.

1. the pair: both folders hold a causal LM in safetensors with a tokenizer that has a chat
   template; ``distillation: token`` needs one tokenizer for both (the logged top-k are
   the teacher's ids), refused otherwise with one line naming ``distillation: sequence``;
2. the traffic sample (``traffic_limit`` prompts, 200 by default: generation is slow) and
   the gold file (``gold_limit``) read and checked;
3. both models answer them greedily (the plan is printed first, the time left after the
   first batch); the seed student's manifest gets the calibration (every scorer, the
   agreement with the teacher at ``agreement_cut``, the draft rule's cut), so any target
   turns into a threshold for exactly that version;
4. ``<workdir>/models/{teacher,student}``, the seed student imported and made current in
   the task's registry, ``<workdir>/serve_config.yaml`` hosting the generative cascade and
   ``<workdir>/distill.yaml``, its distillation job (``kind: generate``).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from distill.greedy import Answers, calibrate, greedy_answers
from distill.prepare import local_serve_config, materialise
from distill.prompts import TaskPrompt, read_prompts
from distill.tables import write_jsonl
from distill.task import GenerateTaskSpec, TaskError
from serving.contracts.manifest import DefaultTarget, ModelManifest, weights_digest, write_manifest
from serving.contracts.registry import Registry
from serving.contracts.threshold import should_escalate
from serving.generate.agreement import rouge_l_many
from serving.generate.models import (
    LanguageModel,
    check_language_model,
    load_language_model,
    load_tokenizer,
    tokenizer_differences,
)


def check_generative_pair(spec: GenerateTaskSpec) -> dict[str, int | None]:
    """Both folders serve; one tokenizer when ``distillation: token``. Returns each
    model's window (its position embeddings)."""
    windows = {}
    for role, folder in (("teacher", spec.teacher), ("student", spec.student)):
        try:
            windows[role] = check_language_model(folder, f"{role} {folder}")
        except ValueError as exc:
            raise TaskError(str(exc)) from None
    differences = tokenizer_differences(load_tokenizer(spec.student), load_tokenizer(spec.teacher))
    if spec.distillation == "token" and differences:
        raise TaskError(
            f"the student's and the teacher's tokenizers differ ({', '.join(differences)}), "
            "and token-level distillation needs one tokenizer: set `distillation: sequence` "
            "in the task file (it trains on the teacher's text)"
        )
    student_window = windows["student"]
    if student_window is not None and spec.max_new_tokens >= student_window:
        raise TaskError(
            f"max_new_tokens {spec.max_new_tokens} leaves no room for a prompt in the "
            f"student's window of {student_window} positions: lower it"
        )
    return windows


def prepare_generate(
    spec: GenerateTaskSpec,
    *,
    force: bool = False,
    device: str = "auto",
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    check_generative_pair(spec)
    traffic = _sample(
        read_prompts(spec.traffic, spec.prompt_column, spec.messages_column), spec.traffic_limit
    )
    gold: list[TaskPrompt] = []
    if spec.gold is not None:
        gold = read_prompts(
            spec.gold, spec.prompt_column, spec.messages_column, spec.reference_column
        )
        gold = _sample(gold, spec.gold_limit)
    registry = Registry(spec.registry_dir)
    student_version = f"student-{weights_digest(spec.student)}"
    current = registry.current()
    if current is not None and current != student_version and not force:
        raise TaskError(
            f"registry {registry.root} already serves {current}; pass --force to make the "
            "seed student current again, or set another registry in the task file"
        )
    spec.work.mkdir(parents=True, exist_ok=True)
    models = spec.work / "models"
    teacher_dir = materialise(spec.teacher, models / "teacher")
    student_dir = materialise(spec.student, models / "student")
    teacher_version = _manifest(teacher_dir, "teacher", spec)
    student_lm = load_language_model(student_dir, device=device)
    teacher_lm = load_language_model(teacher_dir, device=device)
    traffic = _fitting(traffic, student_lm, spec, "traffic", say)
    gold = _fitting(gold, student_lm, spec, "gold", say)
    say(
        f"answering {len(traffic)} traffic and {len(gold)} gold prompts greedily with both "
        f"models (at most {spec.max_new_tokens} new tokens each, {spec.batch_size} at a time)"
    )
    answers = _answer_all(student_lm, teacher_lm, traffic + gold, spec, say)
    n = len(traffic)
    source = f"{n} prompts of the task's traffic ({spec.traffic.name})"
    mine, theirs = _part(answers["student"], 0, n), _part(answers["teacher"], 0, n)
    calibration, figures = calibrate(mine, theirs, spec.agreement_cut, source, spec.scorer)
    threshold = calibration.threshold(spec.scorer, target_agreement=spec.target_agreement)
    confidence = np.asarray(calibration.confidences[spec.scorer])
    figures.update(
        threshold=threshold, escalation_rate=float(np.mean(should_escalate(confidence, threshold)))
    )
    if gold:
        references = [p.reference or "" for p in gold]
        for role in ("student", "teacher"):
            texts = _part(answers[role], n, len(gold)).texts
            figures[f"{role}_gold_rouge_l"] = float(rouge_l_many(texts, references).mean())
        figures["gold_prompts"] = len(gold)
    manifest = ModelManifest(
        version=student_version,
        role="student",
        created_at=time.time(),
        kind="generate",
        agreement_cut=spec.agreement_cut,
        max_prompt_tokens=spec.max_prompt_tokens,
        max_new_tokens=spec.max_new_tokens,
        draft_min_confidence=figures["draft_min_confidence"],
        default_target=DefaultTarget(target_agreement=spec.target_agreement),
        calibration=calibration,
        eval={k: float(v) for k, v in figures.items() if isinstance(v, int | float)},
        training={"seed": str(spec.student), "task": spec.name, "scorer": spec.scorer},
    )
    write_manifest(student_dir, manifest)
    registry.import_folder(student_dir)
    registry.promote(student_version)
    write_jsonl(spec.work / "traffic.jsonl", [p.as_row() for p in traffic])
    if gold:
        write_jsonl(spec.work / "gold.jsonl", [p.as_row() for p in gold])
    serve_config = _write_serve_config(spec, teacher_dir, student_dir)
    distill_config = _write_distill_config(spec, teacher_dir, bool(gold))
    report = {
        "task": spec.name,
        "kind": "generate",
        "teacher": teacher_version,
        "student": student_version,
        "distillation": spec.distillation,
        "figures": {k: v for k, v in figures.items() if k != "escalation_by_target"},
        "escalation_by_target": figures["escalation_by_target"],
        "answer_seconds": {role: round(a.seconds, 1) for role, a in answers.items()},
        "registry": str(registry.root),
        "serve_config": str(serve_config),
        "distill_config": str(distill_config),
    }
    (spec.work / "init_report.json").write_text(json.dumps(report, indent=1))
    return report


def _sample(prompts: list[TaskPrompt], limit: int) -> list[TaskPrompt]:
    return prompts if len(prompts) <= limit else random.Random(0).sample(prompts, limit)


def _fitting(
    prompts: list[TaskPrompt],
    lm: LanguageModel,
    spec: GenerateTaskSpec,
    what: str,
    say: Callable[[str], None],
) -> list[TaskPrompt]:
    """The prompts the gateway would serve: longer than max_prompt_tokens is a 400 there."""
    kept = [p for p in prompts if len(p.render(lm)) <= spec.max_prompt_tokens]
    if len(kept) < len(prompts):
        say(
            f"left out {len(prompts) - len(kept)} {what} prompts longer than "
            f"max_prompt_tokens={spec.max_prompt_tokens} (the gateway refuses them)"
        )
    if what == "traffic" and not kept:
        raise TaskError(
            f"{spec.traffic}: no prompt fits max_prompt_tokens={spec.max_prompt_tokens}"
        )
    return kept


def _answer_all(
    student: LanguageModel,
    teacher: LanguageModel,
    prompts: list[TaskPrompt],
    spec: GenerateTaskSpec,
    say: Callable[[str], None],
) -> dict[str, Answers]:
    """Both models' greedy answers; the time left is printed after the first batch."""
    ids = {"student": [p.render(student) for p in prompts]}
    ids["teacher"] = [p.render(teacher) for p in prompts]
    b = spec.batch_size
    first = {
        role: greedy_answers(lm, ids[role][:b], spec.max_new_tokens, b)
        for role, lm in (("student", student), ("teacher", teacher))
    }
    batches = math.ceil(len(prompts) / b)
    left = sum(a.seconds for a in first.values()) * (batches - 1)
    say(
        f"first batch of {min(b, len(prompts))} took {sum(a.seconds for a in first.values()):.0f} s: about {left / 60:.1f} min left"
    )
    out = {}
    for role, lm in (("student", student), ("teacher", teacher)):
        rest = (
            greedy_answers(lm, ids[role][b:], spec.max_new_tokens, b) if len(prompts) > b else None
        )
        generated = first[role].generated + (rest.generated if rest else [])
        seconds = first[role].seconds + (rest.seconds if rest else 0.0)
        out[role] = Answers(generated, seconds)
    return out


def _part(answers: Answers, start: int, count: int) -> Answers:
    return Answers(answers.generated[start : start + count], answers.seconds)


def _manifest(folder: Path, role: str, spec: GenerateTaskSpec) -> str:
    version = f"{role}-{weights_digest(folder)}"
    manifest = ModelManifest(
        version=version,
        role=role,
        created_at=time.time(),
        kind="generate",
        agreement_cut=spec.agreement_cut,
        max_prompt_tokens=spec.max_prompt_tokens,
        max_new_tokens=spec.max_new_tokens,
    )
    write_manifest(folder, manifest)
    return version


def _write_serve_config(spec: GenerateTaskSpec, teacher: Path, student: Path) -> Path:
    """A gateway hosting the task's generative cascade, every path absolute."""
    generate = {
        "name": spec.name,
        "student": {"path": str(student.resolve())},
        "teacher": {"path": str(teacher.resolve())},
        "scorer": spec.scorer,
        "audit_fraction": spec.audit_fraction,
        "agreement_cut": spec.agreement_cut,
        "registry": str(spec.registry_dir.resolve()),
        "registry_cache_dir": str((spec.work / "registry-cache").resolve()),
        "log": {"dir": str(spec.escalations_dir.resolve())},
    }
    serve = local_serve_config({"generate": generate}, "GenerativeTeacher")
    path = spec.work / "serve_config.yaml"
    header = f"# Written by `protege init` for the generative task {spec.name!r}.\n"
    path.write_text(header + yaml.safe_dump(serve, sort_keys=False))
    return path


def _write_distill_config(spec: GenerateTaskSpec, teacher: Path, gold: bool) -> Path:
    """The task's distillation job (``protege distill run --config``), paths absolute."""
    work = spec.work.resolve()
    distill: dict[str, Any] = {
        "kind": "generate",
        "registry": str(spec.registry_dir.resolve()),
        "log_dir": str(spec.escalations_dir.resolve()),
        "teacher": str(teacher.resolve()),
        "traffic": str(work / "traffic.jsonl"),
        "cache_dir": str(work / "cache"),
        "scorer": spec.scorer,
        "agreement_cut": spec.agreement_cut,
        "distillation": spec.distillation,
        "max_prompt_tokens": spec.max_prompt_tokens,
        "max_new_tokens": spec.max_new_tokens,
        "batch_size": spec.batch_size,
        "gate": {"target_agreement": spec.target_agreement},
    }
    if gold:
        distill["gold"] = str(work / "gold.jsonl")
    path = spec.work / "distill.yaml"
    header = f"# Written by `protege init` for the generative task {spec.name!r}.\n"
    path.write_text(header + yaml.safe_dump(distill, sort_keys=False))
    return path
