"""``make demo``: the whole learning loop on the embedded default models.

Each round serves a chunk of the stream through the gateway (the student answers, the
unsure inputs escalate and are logged), then distils a candidate on those escalations,
gates it against the current student and, if promoted, hot-swaps it into the running
gateway through Serve's in-place ``user_config`` update. A table per round, a summary
with bootstrap intervals, ``var/demo/demo.json`` and a PNG of the learning curve.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distill import bbc
from distill.config import load_distill_config
from distill.defaults import build_defaults
from distill.eval_sets import holdout_set
from distill.evaluate import bootstrap_interval, escalation_needed
from distill.job import run as distill_run
from protege.gateway_process import load_serve_config, running_gateway, with_student
from protege.traffic import send
from serving import local_ray
from serving.client import ProtegeClient
from serving.registry import Registry


def _stream(data: Path, size: int) -> list[str]:
    examples = bbc.read_split(data, "stream") + bbc.read_split(data, "stream_sentences")
    random.Random(5).shuffle(examples)
    return [e.text for e in examples[:size]]


def run_demo(
    cache: Path, config_path: Path, rounds: int, chunk: int, concurrency: int, port: int, out: Path
) -> dict[str, Any]:
    build_defaults(cache)
    data = cache / "data"
    for stale in ("registry", "escalations"):  # each demo starts from the seed student
        shutil.rmtree(out / stale, ignore_errors=True)
    registry = Registry(out / "registry")
    registry.promote(registry.import_folder(cache / "models" / "student"))
    serve_config = load_serve_config(
        config_path, cache, log={"dir": str(out / "escalations")}, registry=str(registry.root)
    )
    distill_config = load_distill_config(
        Path("deploy/distill.yaml"),
        registry=registry.root,
        log_dir=out / "escalations",
        data_dir=data,
        teacher=cache / "models" / "teacher",
    )
    stream = _stream(data, rounds * chunk)
    rows: list[dict[str, Any]] = []
    with running_gateway(serve_config, port=port) as url, ProtegeClient(url) as client:
        for number in range(1, rounds + 1):
            texts = stream[(number - 1) * chunk : number * chunk]
            print(f"\nround {number}: serving {len(texts)} stream inputs, then distilling")
            served = send(url, texts, concurrency=concurrency)
            report = distill_run(distill_config)
            if report["result"] == "promoted":
                local_ray.deploy_config(with_student(serve_config, report["candidate"]), Path.cwd())
                _wait_for_version(client, report["candidate"])
            rows.append(_round_row(number, served, report))
            print_round(rows[-1])
    summary = _summary(registry, distill_config, rows)
    report_all = {"rounds": rows, "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report_all, indent=1))
    print_summary(rows, summary)
    _plot(rows, summary, out / "learning_curve.png")
    print(f"\nwritten: {out / 'demo.json'} and {out / 'learning_curve.png'}")
    return report_all


def _wait_for_version(client: ProtegeClient, version: str, timeout_s: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while client.models().student.version != version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not swap to {version} in {timeout_s} s")
        time.sleep(0.5)


def _round_row(number: int, served: Any, report: dict[str, Any]) -> dict[str, Any]:
    outputs = [o for o in served.outputs if o is not None]
    row = {
        "round": number,
        "served_version": outputs[0].model_version if outputs else "?",
        "served_inputs": len(outputs),
        "served_escalation_rate": float(np.mean([o.escalated for o in outputs])),
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
    }
    if "eval" in report:
        row["before"] = report["eval"]["current"]
        row["after"] = report["eval"]["candidate" if report["result"] == "promoted" else "current"]
    return row


def _summary(registry: Registry, config: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The target figure, seed vs final student, with bootstrap intervals."""
    holdout = holdout_set(config.data_dir, config.holdout_sentences)
    gold_rows = np.array([e.kind == "headline" for e in holdout])
    gold = np.array([bbc.LABELS.index(e.label) for e in holdout])
    scores = config.data_dir / "scores"
    name = f"holdout-{len(holdout)}.npy"
    teacher = np.load(next(scores.glob(f"teacher-*/{name}")))
    versions = [*registry.history(), registry.current()]
    figures: dict[str, Any] = {}
    for label, version in (("seed", versions[0]), ("final", versions[-1])):
        student = np.load(scores / version / name)

        def needed(rows_: np.ndarray, s: np.ndarray = student) -> float:
            return escalation_needed(
                s[rows_], teacher[rows_], gold_rows[rows_], gold[rows_][gold_rows[rows_]]
            )

        everything = np.arange(len(holdout))
        right = student[gold_rows].argmax(1) == gold[gold_rows]
        figures[label] = {
            "version": version,
            "escalation_needed": needed(everything),
            "interval_95": bootstrap_interval(needed, len(holdout)),
            "student_accuracy": float(right.mean()),
            "oracle_escalation_rate": float(1 - right.mean()),
        }
    figures["teacher_accuracy"] = float((teacher[gold_rows].argmax(1) == gold[gold_rows]).mean())
    figures["holdout_inputs"] = len(holdout)
    figures["ratio_final_to_seed"] = figures["final"]["escalation_needed"] / max(
        1e-9, figures["seed"]["escalation_needed"]
    )
    return figures


def print_round(row: dict[str, Any]) -> None:
    lat = row["latency_ms"]
    print(
        f"round {row['round']}: served by {row['served_version']}: escalation {row['served_escalation_rate']:.1%} "
        f"of {row['served_inputs']}, {row['throughput_rps']} req/s, p50/p99 student {lat['student']['p50']}/"
        f"{lat['student']['p99']} ms, teacher {lat['teacher']['p50']}/{lat['teacher']['p99']} ms, "
        f"{row['failed_requests']} failed\n  {row['result']}: {row['reason']}"
    )


def print_summary(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    head = f"{'round':>5} | {'served esc.':>11} | {'holdout esc.':>12} | {'cascade acc':>11} | {'student acc':>11} | {'teacher agr.':>12} | result"
    print("\n" + head + "\n" + "-" * len(head))
    if rows and "before" in rows[0]:
        b = rows[0]["before"]
        print(
            f"{0:>5} | {'':>11} | {b['escalation_rate']:>12.1%} | {b['cascade_accuracy']:>11.1%} | "
            f"{b['gold_accuracy']:>11.1%} | {b['teacher_agreement']:>12.1%} | seed student"
        )
    for row in rows:
        a = row.get("after", {})
        cells = [
            f"{a[k]:.1%}" if k in a else "-"
            for k in ("escalation_rate", "cascade_accuracy", "gold_accuracy", "teacher_agreement")
        ]
        print(
            f"{row['round']:>5} | {row['served_escalation_rate']:>11.1%} | {cells[0]:>12} | {cells[1]:>11} | "
            f"{cells[2]:>11} | {cells[3]:>12} | {row['result']}"
        )
    seed, final = summary["seed"], summary["final"]
    print(
        f"\nescalation needed for a cascade within 1 point of the teacher's gold accuracy and at >= 98 % "
        f"agreement, on {summary['holdout_inputs']} held-out inputs (95 % bootstrap interval):"
    )
    print(
        f"  seed  {seed['version']}: {seed['escalation_needed']:.1%} [{seed['interval_95'][0]:.1%}, {seed['interval_95'][1]:.1%}]"
    )
    print(
        f"  final {final['version']}: {final['escalation_needed']:.1%} [{final['interval_95'][0]:.1%}, {final['interval_95'][1]:.1%}]"
    )
    print(f"  final / seed = {summary['ratio_final_to_seed']:.2f} (target: at most 0.5)")
    print(
        f"gold holdout headlines: teacher {summary['teacher_accuracy']:.1%}; student alone "
        f"{seed['student_accuracy']:.1%} -> {final['student_accuracy']:.1%}; oracle escalation "
        f"(exactly the student's errors) {seed['oracle_escalation_rate']:.1%} -> {final['oracle_escalation_rate']:.1%}"
    )


def _plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r["round"] for r in rows]
    first = rows[0].get("before", {}) if rows else {}
    escalation = [first.get("escalation_rate", np.nan)] + [
        r.get("after", {}).get("escalation_rate", np.nan) for r in rows
    ]
    accuracy = [first.get("cascade_accuracy", np.nan)] + [
        r.get("after", {}).get("cascade_accuracy", np.nan) for r in rows
    ]
    served = [r["served_escalation_rate"] for r in rows]  # chunk r+1 is served by generation r
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, escalation, "o-", label="holdout escalation rate (at 97 % teacher agreement)")
    ax.plot(
        rounds[: len(served)],
        served,
        "s--",
        label="escalation rate while serving the next stream chunk",
    )
    ax.plot(rounds, accuracy, "^-", label="cascade accuracy on gold headlines")
    ax.set_xlabel("student generation (0 = seed; n = after round n)")
    ax.set_ylim(0, 1)
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    ax.set_title("protege: the student learns what it used to escalate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
