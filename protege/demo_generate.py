"""``make demo-generate``: the generative learning loop on the default pair (BBC headlines).

Each round serves a chunk of the stream prompts through the gateway with the official
``openai`` client (the student answers, the answers it is unsure of escalate to the
teacher, every kept answer is logged as a sampled one), then runs the distillation job
(``kind: generate``): it trains a candidate on the teacher's logged answers and top-k,
judges both students on greedy answers against the live records the gateway logged
(weighted estimates with bootstrap intervals) and, if the gate promotes the candidate,
publishes it; the gateway's replicas follow the registry's pointer and swap it in. Beside
the live estimates, the fixed gold holdout (:mod:`protege.demo_generate_holdout`).

Every setting that sizes the demo is here, printed at the start and written with the
results (``var/demo-generate/demo.json``, and a PNG of the learning curve).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill.config import load_distill_config
from distill.generate_config import GenerateDistillConfig
from distill.generate_job import run_generate, sample_prompts, teacher_version
from distill.prompts import TaskPrompt, read_prompts
from protege.bench_generate import ChatClient, wait_for_student
from protege.bench_generate_inprocess import Measured
from protege.default_generate import build_generate
from protege.demo_generate_holdout import GenerateHoldout, HoldoutSettings
from protege.demo_generate_report import plot, print_round, print_summary
from protege.gateway_process import running_gateway
from protege.generate_configs import generate_section, generative_gateway
from serving.contracts.records import iter_records
from serving.contracts.registry import Registry
from serving.generate.models import load_language_model


@dataclass(frozen=True)
class DemoSettings:
    """What sizes the demo (defaults measured to fit three rounds in an hour on 2 cores)."""

    rounds: int = 3
    per_round: int = 200  # stream prompts served each round
    concurrency: int = 8
    target_agreement: float = 0.8  # the seed escalates ~70 % for it (87 % for 0.9)
    audit_fraction: float = 1.0  # every kept answer is logged: all of it is evidence
    eval_share: float = 0.5  # of the logged prompts: judge (half calibrates), never train
    min_sampled: int = 10  # kept answers in the gate split; round 1 gets ~15
    epochs: int = 2
    lr: float = 5e-4
    replay_records: int = 100


def distill_config(path: Path, out: Path, demo: DemoSettings, seed: int) -> GenerateDistillConfig:
    """The default pair's distillation config over the demo's registry and log."""
    config = load_distill_config(path)
    if not isinstance(config, GenerateDistillConfig):
        raise ValueError(f"{path} is not a generative distillation config (kind: generate)")
    return config.model_copy(
        update={
            "registry": str(out / "registry"),
            "log_dir": str(out / "generations"),
            "work_dir": out / "work",
            "replay_records": demo.replay_records,
            "eval": config.eval.model_copy(update={"share": demo.eval_share}),
            "train": config.train.model_copy(
                update={"seed": seed, "epochs": demo.epochs, "lr": demo.lr}
            ),
            "gate": config.gate.model_copy(
                update={
                    "target_agreement": demo.target_agreement,
                    "min_sampled": demo.min_sampled,
                    "min_requests": demo.min_sampled,
                }
            ),
        }
    )


def serve_config(root: Path, out: Path, demo: DemoSettings) -> dict[str, Any]:
    section = generate_section(root) | {
        "registry": str((out / "registry").resolve()),
        "registry_cache_dir": str((out / "registry-cache").resolve()),
        "log": {"dir": str((out / "generations").resolve())},
        "audit_fraction": demo.audit_fraction,
        "target_agreement": demo.target_agreement,
    }
    return generative_gateway(section, torch_threads=1, registry_poll_s=1.0)


def stream_prompts(path: Path, size: int, seed: int) -> list[TaskPrompt]:
    prompts = read_prompts(path, reference_column="reference")
    if len(prompts) < size:
        raise SystemExit(f"error: {path} holds {len(prompts)} prompts; the demo needs {size}")
    random.Random(5 + seed).shuffle(prompts)
    return prompts[:size]


def run_generate_demo(
    cache: Path,
    out: Path,
    demo: DemoSettings = DemoSettings(),
    seed: int = 0,
    port: int = 8000,
    metrics_port: int = 8080,
) -> dict[str, Any]:
    began = time.perf_counter()
    build_generate(cache)
    built = time.perf_counter()
    root = cache / "generate"
    for stale in ("registry", "registry-cache", "generations", "work"):
        shutil.rmtree(out / stale, ignore_errors=True)  # each demo starts from the seed
    registry = Registry(out / "registry")  # the seed as built, whatever the pair's registry holds
    seed_version = registry.import_folder(root / "models" / "student")
    registry.promote(seed_version)
    seed_manifest = registry.manifest(seed_version)
    config = distill_config(root / "distill.yaml", out, demo, seed)
    served = serve_config(root, out, demo)
    print(f"demo settings: {json.dumps(asdict(demo))}, seed {seed}", flush=True)
    stream = stream_prompts(root / "data" / "stream.jsonl", demo.rounds * demo.per_round, seed)
    teacher = load_language_model(config.teacher, device=config.device)
    holdout = GenerateHoldout(  # the judge's gold sample, limits and cache: answers shared
        sample_prompts(config.gold, reference=True, limit=config.gold_limit),
        teacher,
        teacher_version(config),
        config.scores_dir,
        HoldoutSettings(
            config.scorer,
            config.agreement_cut,
            demo.target_agreement,
            seed_manifest.max_new_tokens or config.max_new_tokens,
            config.batch_size,
        ),
        config.device,
    )
    del teacher  # the job loads its own
    seed_figures = holdout.figures(registry.path(seed_version))
    section = served["applications"][0]["args"]["generate"]
    rows: list[dict[str, Any]] = []
    with running_gateway(served, port=port, metrics_port=metrics_port) as url:
        client = ChatClient(url, "unused", section["name"], config.max_new_tokens, None)
        for number in range(1, demo.rounds + 1):
            prompts = stream[(number - 1) * demo.per_round : number * demo.per_round]
            print(f"\nround {number}: serving {len(prompts)} stream prompts, then distilling")
            logged = _count(out / "generations")
            measured = client.row(
                f"round {number}", [p.chat() or [] for p in prompts], [], demo.concurrency
            )
            served_ok = sum(a is not None for a in measured.answers)
            _wait_for_log(out / "generations", logged + served_ok)
            job_began = time.perf_counter()
            report = run_generate(config)
            job_seconds = time.perf_counter() - job_began
            swap_seconds: float | str | None = None
            if report["result"] == "promoted":
                swap_began = time.perf_counter()
                try:
                    wait_for_student(client, report["candidate"])
                    swap_seconds = time.perf_counter() - swap_began
                except TimeoutError as exc:  # the round's row says so; the demo goes on
                    print(f"  !! {exc}")
                    swap_seconds = f"failed: {exc}"
            serving = registry.current() or seed_version
            figures = holdout.figures(registry.path(serving))
            rows.append(_round_row(number, measured, report, figures, job_seconds, swap_seconds))
            print_round(rows[-1])
    finished = time.perf_counter()
    summary = {
        "seed": seed_figures,
        "final": rows[-1]["holdout"] if rows else seed_figures,
        "teacher_rouge_l_gold": holdout.teacher_rouge_l_gold,
        "holdout_prompts": len(holdout.prompts),
        "demo_seed": seed,
        "settings": asdict(demo),
        "agreement_cut": config.agreement_cut,
        "build_minutes": round((built - began) / 60, 1),
        "minutes_after_build": round((finished - built) / 60, 1),
        "rounds_promoted": sum(r["result"] == "promoted" for r in rows),
    }
    results = {"rounds": rows, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(results, indent=1))
    print_summary(rows, summary)
    plot(rows, summary, out / "learning_curve.png")
    print(f"\nwritten: {out / 'demo.json'} and {out / 'learning_curve.png'}")
    return results


def _count(log: Path) -> int:
    return sum(1 for _ in iter_records(log)) if log.exists() else 0


def _wait_for_log(log: Path, records: int, timeout_s: float = 60) -> None:
    """Until the gateway's log holds ``records`` (it writes each after the answer ends)."""
    deadline = time.monotonic() + timeout_s
    while _count(log) < records:
        if time.monotonic() > deadline:
            print(f"  !! the log holds {_count(log)} of {records} records after {timeout_s} s")
            return
        time.sleep(0.5)


def _round_row(
    number: int,
    measured: Measured,
    report: dict[str, Any],
    holdout: dict[str, Any],
    job_seconds: float,
    swap_seconds: float | str | None,
) -> dict[str, Any]:
    answers = [a for a in measured.answers if a is not None]
    latencies = sorted(a.latency_s for a in answers)

    def quantile(q: float) -> float | None:
        return round(latencies[int(q * (len(latencies) - 1))] * 1000) if latencies else None

    return {
        "round": number,
        "served_versions": sorted({a.student_version or "?" for a in answers}),
        "served_prompts": len(answers),
        "failed_requests": len(measured.answers) - len(answers),
        "served_escalation_rate": sum(a.escalated for a in answers) / max(1, len(answers)),
        "throughput_rps": round(len(answers) / measured.seconds, 2) if measured.seconds else 0,
        "latency_ms": {"p50": quantile(0.5), "p95": quantile(0.95)},
        "serve_seconds": round(measured.seconds, 1),
        "distill_seconds": round(job_seconds, 1),
        "swap_seconds": round(swap_seconds, 1) if isinstance(swap_seconds, float) else swap_seconds,
        "result": report["result"],
        "reason": report["reason"],
        "decision": report.get("decision", {}),
        "calibration": report.get("calibration", {}),
        "training": report.get("training", {}),
        "offline_generation": report.get("offline_generation", {}),
        "teacher_likelihood": report.get("teacher_likelihood", {}),
        "holdout": holdout,
    }
