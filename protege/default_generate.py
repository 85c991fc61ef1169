"""Build the default generative pair once, into ``<cache>/generate`` (``protege models
build-generate``): a BBC headline from the article's opening.

    data/split.json     how the prompts were split (see protege.headline_task)
    data/tune.jsonl     train articles with gold headlines: the teacher's fine-tune
    data/dev.jsonl      train articles with gold: whether that fine-tune is kept
    data/seed.jsonl     seed articles with the teacher's answers: the student's training set
    data/traffic.jsonl  the other train articles (neither model trained on them): the
                        calibration sample is its head; traffic for a demo or benchmark
    data/gold.jsonl     holdout articles with gold headlines: measurement only
    data/stream.jsonl   stream articles with gold headlines: a live demo's requests
    models/teacher-base/   SmolLM2-135M-Instruct, float32 safetensors from the wheel's GGUF
    models/teacher/        the teacher served: the base fine-tuned on gold headlines, kept
                           only if that raised both ROUGE-L against gold and the share of
                           answers that stop on their own (on dev); else the base
    models/student/        the seed student: some of the teacher's layers, trained on its
                           answers; with protege.json (calibration, limits, draft rule)
    registry/              the seed student imported and current
    report.json            figures and the seconds each stage took

Model folders are written to ``.partial`` and renamed when complete, so an interrupted
build resumes; the whole build is skipped once report.json exists. Everything runs on a
fixed number of torch threads and seeded, so two builds on one machine agree.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from distill.causal_lm import CausalExample, CausalTrainSettings, train_causal_lm
from distill.greedy import Answers, answer_ids, greedy_answers
from distill.greedy import calibrate as calibrate_answers
from protege import headline_task as task
from protege.default_models import fixed_threads
from protege.generate_configs import write_configs
from protege.headline_task import HeadlinePrompt
from protege.smollm2 import convert_teacher, evenly_spaced, is_model_folder, keep_layers
from serving.contracts.manifest import (
    Calibration,
    DefaultTarget,
    ModelManifest,
    weights_digest,
    write_manifest,
)
from serving.contracts.registry import Registry
from serving.contracts.threshold import should_escalate
from serving.generate.agreement import rouge_l_many
from serving.generate.config import DEFAULT_SCORER
from serving.generate.models import LanguageModel, load_language_model, render_chat

BUILD_SEED = 0
BUILD_INFO = "build.json"  # how a model folder was made (training figures)


@dataclass(frozen=True)
class GenerateProfile:
    student_layers: int  # of the teacher's 30, evenly spaced, first and last included
    tune_prompts: int  # gold headlines the teacher is fine-tuned on
    dev_prompts: int  # train articles that decide whether the fine-tune is kept
    seed_prompts: int  # prompts whose teacher answers train the student: seed articles,
    # then (beyond the seed split's 234) train articles after the traffic sample
    traffic_prompts: int  # calibration sample (train articles neither model trained on)
    gold_prompts: int  # holdout articles measured in the report
    teacher_tune: CausalTrainSettings
    student: CausalTrainSettings
    threads: int  # torch threads for the whole build: fixed, so the weights are repeatable
    max_new_tokens: int = 24
    max_prompt_tokens: int = 512
    agreement_cut: float = 0.5
    target_agreement: float = 0.9  # the threshold target recorded with the seed student
    batch_size: int = 8  # prompts generated together
    single_prompts: int = 8  # gold prompts also generated one at a time (tokens/s at batch 1)


# The full profile, sized for about 30 minutes on 2 cores (PLAN_RATES). The student keeps
# every third layer: at equal training (234 prompts x 3 epochs) a 15-layer copy was no
# better against gold (ROUGE-L 0.097 against 0.092 on 32 dev prompts) and trained 1.3x
# slower, so the time goes to more prompts instead. The tied embedding / LM head stays
# frozen in both fine-tunes (28 M of the parameters; training it doubled the step time).
# One torch thread: on 2 free cores two threads were 1.75x faster, but on a shared machine
# they were 6x slower (each waits on the other at every barrier), and one thread fits.
PROFILES = {
    "full": GenerateProfile(
        student_layers=10,
        tune_prompts=128,
        dev_prompts=48,
        seed_prompts=480,
        traffic_prompts=160,
        gold_prompts=96,
        teacher_tune=CausalTrainSettings(epochs=1, batch_size=8, lr=1e-4, train_embeddings=False),
        student=CausalTrainSettings(epochs=2, batch_size=8, lr=1e-3, train_embeddings=False),
        threads=1,
    ),
    "lite": GenerateProfile(  # the same code path in a few minutes, for CI
        student_layers=3,
        tune_prompts=8,
        dev_prompts=6,
        seed_prompts=12,
        traffic_prompts=12,
        gold_prompts=6,
        teacher_tune=CausalTrainSettings(epochs=1, batch_size=8, lr=1e-4, train_embeddings=False),
        student=CausalTrainSettings(epochs=1, batch_size=8, lr=1e-3, train_embeddings=False),
        threads=1,
        single_prompts=2,
    ),
}
PLAN_RATES = {
    "convert_s": 35.0,  # the GGUF load and the float32 save
    "untuned_answer_s": 1.5,  # the base teacher rarely stops: 24 tokens
    "teacher_answer_s": 0.6,  # a headline, 8 prompts a batch
    "student_answer_s": 0.3,
    "teacher_train_eps": 0.35,  # examples a second, batch 8
    "student_train_eps": 1.6 * 10,  # times the student's layers: 1.6 for 10 layers
}
"""Rates measured on the 2-core machine (one thread, shared), for the plan's estimate."""


@dataclass
class Stages:
    """Seconds per stage, printed as each ends."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        print(f"[build-generate] {name} ...", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 1)
        print(f"[build-generate] {name}: {self.seconds[name]} s", flush=True)


def answer(
    lm: LanguageModel, prompts: Sequence[HeadlinePrompt], profile: GenerateProfile
) -> Answers:
    """Greedy answers to the prompts' chats, in their order."""
    ids = [render_chat(lm.tokenizer, p.messages()) for p in prompts]
    return greedy_answers(lm, ids, profile.max_new_tokens, profile.batch_size)


def one_at_a_time(
    lm: LanguageModel, prompts: Sequence[HeadlinePrompt], profile: GenerateProfile
) -> float:
    """Tokens/s generating each prompt alone (batch 1): what one request sees."""
    return answer(lm, prompts, replace(profile, batch_size=1)).tokens_per_s


def quality(answers: Answers, prompts: Sequence[HeadlinePrompt]) -> dict[str, float]:
    gold = rouge_l_many(answers.texts, [p.headline for p in prompts])
    return {"gold_rouge_l": float(gold.mean()), "stop_rate": answers.stop_rate}


def train(
    lm: LanguageModel, examples: list[CausalExample], settings: CausalTrainSettings, desc: str
) -> dict[str, Any]:
    start = time.perf_counter()
    losses = train_causal_lm(lm.model, examples, settings, lm.pad_token_id, desc=desc)
    seconds = time.perf_counter() - start
    return {
        "examples": len(examples),
        "epoch_losses": [round(x, 4) for x in losses],
        "examples_per_s": round(len(examples) * settings.epochs / seconds, 3),
        "settings": asdict(settings),
    }


def save(
    target: Path, info: dict[str, Any], lm: LanguageModel | None = None, copy_of: Path | None = None
) -> None:
    """``lm`` (or a copy of the folder ``copy_of``) into ``target`` with ``build.json``,
    through a .partial folder renamed when complete."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if lm is not None:
        lm.model.save_pretrained(partial)
        lm.tokenizer.save_pretrained(partial)
    else:
        assert copy_of is not None
        shutil.copytree(copy_of, partial)
    (partial / BUILD_INFO).write_text(json.dumps(info, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def build_info(folder: Path) -> dict[str, Any]:
    return dict(json.loads((folder / BUILD_INFO).read_text()))


def tune_teacher(
    base: Path,
    target: Path,
    tune: list[HeadlinePrompt],
    dev: list[HeadlinePrompt],
    profile: GenerateProfile,
    device: str,
) -> None:
    """Fine-tune the base on gold headlines; keep it only if it raises both ROUGE-L
    against gold and the stop rate on ``dev``, else serve the base as it is."""
    lm = load_language_model(base, device=device)
    before = quality(answer(lm, dev, profile), dev)
    eos = int(lm.tokenizer.eos_token_id)
    examples = [
        CausalExample(
            render_chat(lm.tokenizer, p.messages()),
            lm.tokenizer(p.headline, add_special_tokens=False)["input_ids"] + [eos],
        )
        for p in tune
    ]
    training = train(lm, examples, profile.teacher_tune, "tune teacher")
    after = quality(answer(lm, dev, profile), dev)
    kept = all(after[k] > before[k] for k in ("gold_rouge_l", "stop_rate"))
    verdict = "kept" if kept else "refused: the teacher is the base"
    print(f"teacher fine-tune, on {len(dev)} dev prompts: {before} -> {after}: {verdict}")
    info = {"dev_before": before, "dev_after": after, "kept": kept, "training": training}
    if kept:
        save(target, info, lm=lm)
    else:
        save(target, info, copy_of=base)


def seed_student(
    teacher: LanguageModel,
    target: Path,
    seed: list[HeadlinePrompt],
    seed_file: Path,
    profile: GenerateProfile,
) -> None:
    """A copy of the teacher keeping ``student_layers`` layers, trained on the teacher's
    greedy answers to the seed prompts (written to ``seed_file``, replayed later)."""
    answers = answer(teacher, seed, profile)
    rows = [
        {
            "messages": p.messages(),
            "article": p.article,
            "answer": g.text,
            "finish_reason": g.finish_reason,
        }
        for p, g in zip(seed, answers.generated, strict=True)
    ]
    write_rows(seed_file, rows)
    torch.manual_seed(BUILD_SEED)
    layers = evenly_spaced(teacher.model.config.num_hidden_layers, profile.student_layers)
    pruned = keep_layers(teacher.model, layers)
    cast(Any, pruned).to(teacher.device)  # transformers wraps `to` beyond mypy's reach
    student = LanguageModel(pruned, teacher.tokenizer, teacher.device, teacher.eos_token_ids)
    eos = int(teacher.tokenizer.eos_token_id)
    examples = [
        CausalExample(render_chat(teacher.tokenizer, p.messages()), answer_ids(g, eos))
        for p, g in zip(seed, answers.generated, strict=True)
        if answer_ids(g, eos)
    ]
    training = train(student, examples, profile.student, "seed student")
    info = {
        "training": training,
        "layers_kept": layers,
        "teacher_answers": {
            "prompts": len(seed),
            "seconds": round(answers.seconds, 1),
            "stop_rate": answers.stop_rate,
        },
    }
    save(target, info, lm=student)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def calibrate(
    student: LanguageModel,
    teacher: LanguageModel,
    traffic: list[HeadlinePrompt],
    profile: GenerateProfile,
) -> tuple[Calibration, dict[str, Any]]:
    """The seed student's calibration on traffic it never trained on (see
    :func:`distill.greedy.calibrate`)."""
    mine, theirs = answer(student, traffic, profile), answer(teacher, traffic, profile)
    source = f"{len(traffic)} prompts of the task's traffic (data/traffic.jsonl)"
    return calibrate_answers(mine, theirs, profile.agreement_cut, source)


def build_generate(
    cache: Path, profile: str | GenerateProfile = "full", device: str = "auto"
) -> dict[str, Any]:
    """Build (or reuse) the generative pair in ``<cache>/generate``; returns the report.
    ``profile`` names one of :data:`PROFILES` (or is one, for tests)."""
    profile_name = profile if isinstance(profile, str) else "custom"
    if isinstance(profile, str):
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        profile = PROFILES[profile]
    root = cache / "generate"
    report_path = root / "report.json"
    if report_path.exists():
        write_configs(cache, profile)
        return dict(json.loads(report_path.read_text()))
    started = time.perf_counter()
    data, models = root / "data", root / "models"
    prompts = task.headline_prompts()
    roles = assign(prompts, profile)
    print_plan(profile_name, profile, roles)
    write_task_files(data, prompts, roles)
    stages = Stages()
    report: dict[str, Any] = {"profile": profile_name, "plan": plan(profile, roles)}
    with fixed_threads(profile.threads):
        torch.manual_seed(BUILD_SEED)
        with stages.stage("teacher from GGUF"):
            convert_teacher(models / "teacher-base")
        if not is_model_folder(models / "teacher"):
            with stages.stage("teacher fine-tune"):
                tune_teacher(
                    models / "teacher-base",
                    models / "teacher",
                    roles["tune"],
                    roles["dev"],
                    profile,
                    device,
                )
        report["teacher_fine_tune"] = build_info(models / "teacher")
        teacher = load_language_model(models / "teacher", device=device)
        if not is_model_folder(models / "student"):
            with stages.stage("student seed"):
                seed_student(
                    teacher, models / "student", roles["seed"], data / "seed.jsonl", profile
                )
        report["student_seed"] = build_info(models / "student")
        student = load_language_model(models / "student", device=device)
        with stages.stage("measure on gold"):
            report["gold"] = measure(teacher, student, roles["gold"], profile)
        with stages.stage("calibrate"):
            calibration, report["calibration"] = calibrate(
                student, teacher, roles["traffic"], profile
            )
        with stages.stage("register"):
            report["teacher"] = register_teacher(models / "teacher", profile)
            report["student"], report["registry"] = register_student(
                models / "student", root / "registry", calibration, report, profile
            )
    report["seconds"] = {**stages.seconds, "total": round(time.perf_counter() - started, 1)}
    report["threads"] = profile.threads
    serve_config, distill_config = write_configs(cache, profile)
    report["serve_config"], report["distill_config"] = str(serve_config), str(distill_config)
    report_path.write_text(json.dumps(report, indent=1))
    return report


def assign(
    prompts: dict[str, list[HeadlinePrompt]], profile: GenerateProfile
) -> dict[str, list[HeadlinePrompt]]:
    """Which prompts play which role; no article has two roles that would leak (the
    student never trains on traffic or gold, the teacher never on dev, traffic or gold)."""
    train, seed = prompts["train"], prompts["seed"]
    t, d, c = profile.tune_prompts, profile.dev_prompts, profile.traffic_prompts
    top_up = max(0, profile.seed_prompts - len(seed))  # seed articles first, then train ones
    needed = {"train": t + d + c + top_up, "holdout": profile.gold_prompts}
    for split, n in needed.items():
        if n > len(prompts[split]):
            raise ValueError(
                f"the profile needs {n} {split} articles; there are {len(prompts[split])}"
            )
    extra = train[t + d + c : t + d + c + top_up]
    return {
        "tune": train[:t],
        "dev": train[t : t + d],
        "traffic": train[t + d : t + d + c],
        "traffic_file": train[t + d : t + d + c] + train[t + d + c + top_up :],
        "seed": seed[: profile.seed_prompts] + extra,
        "gold": prompts["holdout"][: profile.gold_prompts],
        "gold_file": prompts["holdout"],
        "stream": prompts["stream"],
    }


def write_task_files(
    data: Path, prompts: dict[str, list[HeadlinePrompt]], roles: dict[str, list[HeadlinePrompt]]
) -> None:
    data.mkdir(parents=True, exist_ok=True)
    summary = {
        **task.describe(prompts),
        "roles": {name: len(p) for name, p in roles.items()},
        "files": {
            "tune.jsonl": "teacher fine-tune (train articles, gold)",
            "dev.jsonl": "keep-or-refuse the fine-tune (train articles, gold)",
            "seed.jsonl": "the student's training prompts with the teacher's answers",
            "traffic.jsonl": "train articles neither model trained on; calibration = its head",
            "gold.jsonl": "holdout articles with gold headlines (measurement only)",
            "stream.jsonl": "stream articles with gold headlines (a demo's requests)",
        },
    }
    (data / "split.json").write_text(json.dumps(summary, indent=1))
    task.write_prompts(data / "tune.jsonl", roles["tune"], gold=True)
    task.write_prompts(data / "dev.jsonl", roles["dev"], gold=True)
    task.write_prompts(data / "traffic.jsonl", roles["traffic_file"], gold=False)
    task.write_prompts(data / "gold.jsonl", roles["gold_file"], gold=True)
    task.write_prompts(data / "stream.jsonl", roles["stream"], gold=True)


def plan(profile: GenerateProfile, roles: dict[str, list[HeadlinePrompt]]) -> dict[str, Any]:
    """What the build will do, with a rough time at nominal 2-core rates."""
    n = {name: len(p) for name, p in roles.items()}
    r = PLAN_RATES
    teacher_answers = 2 * n["dev"] + n["seed"] + n["gold"] + n["traffic"]
    student_answers = n["gold"] + n["traffic"]
    estimate = (
        r["convert_s"]
        + n["dev"] * (r["untuned_answer_s"] + r["teacher_answer_s"])
        + n["tune"] * profile.teacher_tune.epochs / r["teacher_train_eps"]
        + (n["seed"] + n["gold"] + n["traffic"]) * r["teacher_answer_s"]
        + student_answers * r["student_answer_s"]
        + n["seed"] * profile.student.epochs / (r["student_train_eps"] / profile.student_layers)
        + profile.single_prompts * (r["untuned_answer_s"] + r["student_answer_s"])
    )
    return {
        "prompts": {k: n[k] for k in ("tune", "dev", "seed", "traffic", "gold")},
        "teacher_fine_tune": {"examples": n["tune"], "epochs": profile.teacher_tune.epochs},
        "student_seed": {
            "examples": n["seed"],
            "epochs": profile.student.epochs,
            "layers": profile.student_layers,
        },
        "teacher_answers": teacher_answers,
        "student_answers": student_answers,
        "max_new_tokens": profile.max_new_tokens,
        "threads": profile.threads,
        "estimated_minutes": round(estimate / 60, 1),
    }


def print_plan(name: str, profile: GenerateProfile, roles: dict[str, list[HeadlinePrompt]]) -> None:
    p = plan(profile, roles)
    print(
        f"[build-generate] plan ({name}): teacher fine-tune on {p['teacher_fine_tune']['examples']}"
        f" gold headlines x {p['teacher_fine_tune']['epochs']} epoch(s), kept if it helps on "
        f"{p['prompts']['dev']} dev prompts; student = {profile.student_layers} of 30 layers, "
        f"trained on the teacher's answers to {p['student_seed']['examples']} prompts x "
        f"{p['student_seed']['epochs']} epoch(s); measured on {p['prompts']['gold']} gold "
        f"prompts, calibrated on {p['prompts']['traffic']} traffic prompts; "
        f"{p['teacher_answers']} teacher and {p['student_answers']} student answers of at most "
        f"{profile.max_new_tokens} tokens; {profile.threads} threads; "
        f"about {p['estimated_minutes']} min at nominal 2-core rates",
        flush=True,
    )


def measure(
    teacher: LanguageModel,
    student: LanguageModel,
    gold: list[HeadlinePrompt],
    profile: GenerateProfile,
) -> dict[str, Any]:
    """Both models on held-out gold prompts: ROUGE-L against gold (with a paired bootstrap
    interval of the difference), stop rate, agreement, tokens/s batched and alone."""
    figures: dict[str, Any] = {"prompts": len(gold)}
    answers = {}
    for role, lm in (("teacher", teacher), ("student", student)):
        answers[role] = answer(lm, gold, profile)
        figures[role] = {
            **quality(answers[role], gold),
            "mean_answer_tokens": float(
                np.mean([g.completion_tokens for g in answers[role].generated])
            ),
            "tokens_per_s_batched": answers[role].tokens_per_s,
            "tokens_per_s_alone": one_at_a_time(lm, gold[: profile.single_prompts], profile),
            "examples": [
                {"reference": p.headline, "answer": g.text}
                for p, g in list(zip(gold, answers[role].generated, strict=True))[:5]
            ],
        }
    headlines = [p.headline for p in gold]
    diff = rouge_l_many(answers["teacher"].texts, headlines) - rouge_l_many(
        answers["student"].texts, headlines
    )
    rng = np.random.default_rng(BUILD_SEED)
    draws = diff[rng.integers(0, len(diff), size=(2000, len(diff)))].mean(1)
    figures["teacher_minus_student_gold_rouge_l"] = {
        "mean": float(diff.mean()),
        "interval_95": [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))],
    }
    rouge = rouge_l_many(answers["student"].texts, answers["teacher"].texts)
    figures["student_teacher_rouge_l"] = float(rouge.mean())
    figures["agreement"] = float(np.mean(rouge >= profile.agreement_cut))
    return figures


def generate_manifest(
    folder: Path, role: str, profile: GenerateProfile, **fields: Any
) -> ModelManifest:
    return ModelManifest(
        version=f"{role}-{weights_digest(folder)}",
        role=role,
        created_at=time.time(),
        kind="generate",
        agreement_cut=profile.agreement_cut,
        max_prompt_tokens=profile.max_prompt_tokens,
        max_new_tokens=profile.max_new_tokens,
        **fields,
    )


def register_teacher(folder: Path, profile: GenerateProfile) -> str:
    manifest = generate_manifest(folder, "teacher", profile, training=build_info(folder))
    write_manifest(folder, manifest)
    return manifest.version


def register_student(
    folder: Path,
    registry_root: Path,
    calibration: Calibration,
    report: dict[str, Any],
    profile: GenerateProfile,
) -> tuple[str, str]:
    """The seed student's manifest (calibration, limits, draft rule), imported into the
    registry and made current."""
    threshold = calibration.threshold(DEFAULT_SCORER, target_agreement=profile.target_agreement)
    confidence = np.asarray(calibration.confidences[DEFAULT_SCORER])
    gold = report["gold"]
    figures = {
        "gold_prompts": float(gold["prompts"]),
        "student_gold_rouge_l": gold["student"]["gold_rouge_l"],
        "teacher_gold_rouge_l": gold["teacher"]["gold_rouge_l"],
        "student_stop_rate": gold["student"]["stop_rate"],
        "traffic_prompts": float(len(calibration.agrees_with_teacher)),
        "student_teacher_agreement": float(np.mean(calibration.agrees_with_teacher)),
        "threshold": threshold,
        "escalation_rate": float(np.mean(should_escalate(confidence, threshold))),
    }
    manifest = generate_manifest(
        folder,
        "student",
        profile,
        draft_min_confidence=report["calibration"]["draft_min_confidence"],
        default_target=DefaultTarget(target_agreement=profile.target_agreement),
        calibration=calibration,
        eval=figures,
        training={**build_info(folder), "task": "bbc-headlines", "scorer": DEFAULT_SCORER},
    )
    write_manifest(folder, manifest)
    registry = Registry(registry_root)
    registry.import_folder(folder)
    registry.promote(manifest.version)
    report["calibration"].update(threshold=threshold, escalation_rate=figures["escalation_rate"])
    return manifest.version, str(registry_root)


def format_report(report: dict[str, Any]) -> str:
    """The report's headline figures, for the terminal."""
    gold, cal = report["gold"], report["calibration"]
    tune = report["teacher_fine_tune"]
    diff = gold["teacher_minus_student_gold_rouge_l"]
    low, high = diff["interval_95"]
    cut = cal["draft_min_confidence"]
    draft = (
        f"the teacher verifies drafts of confidence >= {cut:.3f}"
        if cut <= 1
        else "no draft pays for its verification: the teacher skips them"
    )
    lines = [
        f"teacher fine-tune on gold headlines: {'kept' if tune['kept'] else 'refused'} "
        f"(dev ROUGE-L {tune['dev_before']['gold_rouge_l']:.3f} -> "
        f"{tune['dev_after']['gold_rouge_l']:.3f}, stop rate "
        f"{tune['dev_before']['stop_rate']:.0%} -> {tune['dev_after']['stop_rate']:.0%})",
        f"on {gold['prompts']} held-out gold prompts:",
    ]
    for role in ("teacher", "student"):
        g = gold[role]
        lines.append(
            f"  {role:<8} ROUGE-L vs gold {g['gold_rouge_l']:.3f}, stops {g['stop_rate']:.0%}, "
            f"{g['tokens_per_s_alone']:.1f} tokens/s alone, "
            f"{g['tokens_per_s_batched']:.1f} batched"
        )
    lines += [
        f"  teacher - student ROUGE-L {diff['mean']:+.3f} (95% interval {low:+.3f} to {high:+.3f})",
        f"calibration on {cal['traffic_prompts']} traffic prompts: agreement with the teacher "
        f"{cal['agreement']:.0%} (ROUGE-L >= cut), threshold {cal['threshold']:.3f} for the "
        f"target, escalation {cal['escalation_rate']:.0%}; {draft}",
        f"student {report['student']} is current in {report['registry']}",
        "seconds: " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()),
    ]
    return "\n".join(lines)
