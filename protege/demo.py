"""``make demo``: the whole learning loop on the embedded default task (BBC News).

Each round serves a chunk of the stream through the gateway (the student answers, the
unsure inputs escalate, a uniform sample of the confident ones is logged), then runs the
distillation job: it trains a candidate, judges it against the current student on the
live traffic the gateway logged (weighted estimates with bootstrap intervals), and, if
the gate promotes it, the demo hot-swaps it into the running gateway through Serve's
in-place ``user_config`` update. Beside the live estimates, the fixed BBC holdout.
Writes ``var/demo/demo.json`` and a PNG of the learning curve.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from distill.config import load_classify_config
from distill.job import run as distill_run
from protege import bbc
from protege.default_models import build_defaults
from protege.demo_holdout import Holdout
from protege.demo_report import plot, print_round, print_summary
from protege.gateway_process import (
    load_serve_config,
    running_gateway,
    wait_for_version,
    with_student,
)
from protege.traffic import send
from serving import local_ray
from serving.client import ProtegeClient
from serving.contracts.registry import Registry

DEMO_AUDIT_FRACTION = 0.5  # so each round's gate rests on a hundred or more sampled records
DEMO_EVAL_SHARE = 0.5


def _stream(data: Path, size: int, seed: int) -> list[str]:
    examples = bbc.read_split(data, "stream") + bbc.read_split(data, "stream_sentences")
    random.Random(5 + seed).shuffle(examples)
    return [e.text for e in examples[:size]]


def run_demo(
    cache: Path,
    config_path: Path,
    rounds: int,
    chunk: int,
    concurrency: int,
    port: int,
    out: Path,
    seed: int = 0,
    metrics_port: int = 8080,
) -> dict[str, Any]:
    build_defaults(cache)
    for stale in ("registry", "escalations"):  # each demo starts from the seed student
        shutil.rmtree(out / stale, ignore_errors=True)
    registry = Registry(out / "registry")
    registry.promote(registry.import_folder(cache / "models" / "student"))
    serve_config = load_serve_config(
        config_path,
        cache,
        log={"dir": str(out / "escalations")},
        registry=str(registry.root),
        cascade={"audit_fraction": DEMO_AUDIT_FRACTION, "audit_teacher": "offline"},
    )
    distill_config = load_classify_config(
        Path("deploy/distill.yaml"), registry=registry.root, log_dir=out / "escalations"
    )
    distill_config = distill_config.model_copy(
        update={
            "cache_dir": cache / "cache",  # where `protege init` left its scores
            "eval": distill_config.eval.model_copy(
                update={"share": DEMO_EVAL_SHARE, "min_calibration_sampled": 50}
            ),
            "train": distill_config.train.model_copy(update={"seed": seed}),
            # about a hundred sampled gate records per round, pooled across rounds
            "gate": distill_config.gate.model_copy(update={"min_sampled": 50}),
        }
    )
    holdout = Holdout(cache, cache / "cache")
    stream = _stream(cache / "data", rounds * chunk, seed)
    rows: list[dict[str, Any]] = []
    seed_figures = holdout.figures(registry.path(registry.current() or ""))
    gateway = running_gateway(serve_config, port=port, metrics_port=metrics_port)
    with gateway as url, ProtegeClient(url) as client:
        for number in range(1, rounds + 1):
            texts = stream[(number - 1) * chunk : number * chunk]
            print(f"\nround {number}: serving {len(texts)} stream inputs, then distilling")
            served = send(url, texts, concurrency=concurrency)
            report = distill_run(distill_config)
            swapped = {
                "promoted": report.get("candidate"),
                "recalibrated": (report.get("recalibration") or {}).get("version"),
            }.get(report["result"])
            if swapped:  # a new student, or the same one recalibrated to the traffic
                local_ray.deploy_config(with_student(serve_config, swapped), Path.cwd())
                wait_for_version(client, swapped)
            serving = registry.current() or ""
            rows.append(_round_row(number, served, report, holdout.figures(registry.path(serving))))
            print_round(rows[-1])
    final = rows[-1]["holdout"] if rows else seed_figures
    summary: dict[str, Any] = {
        "seed": seed_figures,
        "final": final,
        "teacher_gold_accuracy": holdout.teacher_gold_accuracy,
        "holdout_inputs": len(holdout.texts),
        "demo_seed": seed,
        "audit_fraction": DEMO_AUDIT_FRACTION,
        "eval_share": DEMO_EVAL_SHARE,
    }
    summary["ratio_final_to_seed"] = final["escalation_needed"] / max(
        1e-9, seed_figures["escalation_needed"]
    )
    report_all = {"rounds": rows, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report_all, indent=1))
    print_summary(rows, summary)
    plot(rows, summary, out / "learning_curve.png")
    print(f"\nwritten: {out / 'demo.json'} and {out / 'learning_curve.png'}")
    return report_all


def _round_row(
    number: int, served: Any, report: dict[str, Any], holdout: dict[str, Any]
) -> dict[str, Any]:
    outputs = [o for o in served.outputs if o is not None]
    return {
        "round": number,
        "served_version": next((o.model_version for o in outputs if o.tier == "student"), "?"),
        "served_inputs": len(outputs),
        "served_escalation_rate": sum(o.escalated for o in outputs) / max(1, len(outputs)),
        "failed_requests": served.failures,
        "throughput_rps": round(served.throughput, 1),
        "latency_ms": {
            tier: {
                "p50": round(served.latency_ms(tier, 50), 1),
                "p99": round(served.latency_ms(tier, 99), 1),
            }
            for tier in ("student", "teacher")
        },
        "result": report["result"],
        "reason": report["reason"],
        "decision": report.get("decision", {}),
        "calibration": report.get("calibration", {}),
        "holdout": holdout,
    }
