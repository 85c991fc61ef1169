"""Rows, targets and the markdown table of ``protege bench``.

Each served row is set against the in-process limit at the same batch size: the student's
or the teacher's rate, or for the cascade both combined at the row's escalation rate
(every input pays the student, the escalated ones the teacher too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from protege.bench_inprocess import InProcess
from protege.traffic import Run


def limit_rate(limits: dict[str, InProcess], model: str, batch: int, escalated: float) -> float:
    """Inputs/s the models reach in process for this row's work."""
    if model == "cascade":
        student, teacher = limits["student"].rates[batch], limits["teacher"].rates[batch]
        return 1.0 / (1.0 / student + escalated / teacher)
    return limits[model].rates[batch]


def served_row(
    name: str,
    stack: str,
    run: Run,
    gold: list[str],
    batch: int,
    limits: dict[str, InProcess],
    limit_model: str,
) -> dict[str, Any]:
    labels = [o.label if o else None for o in run.outputs]
    escalated = float(np.mean([bool(o and o.escalated) for o in run.outputs]))
    inputs_per_s = run.throughput * batch
    limit = limit_rate(limits, limit_model, batch, escalated)
    versions = sorted({o.model_version for o in run.outputs if o and o.tier == "student"})
    return {
        "scenario": name,
        "stack": stack,
        "model": ",".join(versions),
        "requests": len(run.latency_s),
        "inputs_per_request": batch,
        "failed": run.failures,
        "throughput_rps": round(run.throughput, 1),
        "inputs_per_s": round(inputs_per_s, 1),
        "p50_ms": round(run.latency_ms(None, 50), 1),
        "p99_ms": round(run.latency_ms(None, 99), 1),
        "accuracy": round(float(np.mean([a == b for a, b in zip(labels, gold, strict=True)])), 4),
        "escalation_rate": round(escalated, 4),
        "limit": f"{limit_model}, in process, batch {batch}",
        "limit_inputs_per_s": round(limit, 1),
        "share_of_limit": round(inputs_per_s / limit, 2),
    }


def _target(value: float, target: float, what: str) -> dict[str, Any]:
    return {"what": what, "value": round(value, 3), "target": target, "met": value >= target}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets per Serve stack, reported (never asserted)."""
    by = {r["scenario"]: r for r in rows}
    plain = by["student-only (plain uvicorn, no Ray)"]["throughput_rps"]
    out: dict[str, Any] = {}
    for stack in sorted({r["stack"] for r in rows if r["stack"].startswith("Serve")}):

        def row(name: str, stack: str = stack) -> dict[str, Any]:
            return by[f"{name} ({stack})"]

        student, teacher = row("student-only"), row("teacher alone")
        near = row("cascade, within 1 pt of teacher")
        haproxy = "haproxy" in stack
        out[stack] = {
            "student_single_vs_in_process_batch_1": _target(
                student["share_of_limit"], 2.0, "student, 1 input/request, x its batch-1 rate"
            ),
            "teacher_alone_vs_in_process_batch_1": _target(
                teacher["share_of_limit"], 2.0, "teacher alone, x its batch-1 rate"
            ),
            "student_32_vs_in_process_batch_32": _target(
                row("student-only, 32 inputs/request")["share_of_limit"],
                0.8,
                "student, 32 inputs/request, share of its batch-32 rate",
            ),
            "student_single_vs_plain_uvicorn": _target(
                student["throughput_rps"] / plain,
                1.0 if haproxy else 0.6,
                "student, 1 input/request, x plain uvicorn",
            ),
            "cascade_near_teacher_vs_teacher_alone": _target(
                near["throughput_rps"] / teacher["throughput_rps"],
                4.0,
                "cascade within 1 pt of the teacher, x teacher alone",
            ),
            "cascade_near_teacher_accuracy_gap": round(teacher["accuracy"] - near["accuracy"], 4),
            "cascade_default_vs_teacher_alone": round(
                row("cascade, default target")["throughput_rps"] / teacher["throughput_rps"], 2
            ),
            "p99_ms": {"student-only": student["p99_ms"], "teacher alone": teacher["p99_ms"]},
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    student = report["student"]
    if student["learned"]:
        head = f"Learned student `{student['version']}` (seed `{student['seed']}`)"
    else:
        head = f"**ONLY THE SEED `{student['seed']}` WAS MEASURED: no learned student yet**"
    lines = [
        f"{head}; {report['requests']} requests from {report['concurrency']} clients; "
        f"{report['threads_per_replica']} torch thread per replica and in process.",
        "",
        "| scenario | inputs/req | req/s | inputs/s | p50 ms | p99 ms | accuracy | escalated "
        "| mean batch | limit inputs/s | share of limit |",
        "|" + "---|" * 11,
    ]
    for r in report["rows"]:
        served = "requests" in r
        batch = ", ".join(f"{k} {v['mean']}" for k, v in r.get("mean_batch", {}).items())
        escalated = f"{r['escalation_rate']:.1%}" if served else ""
        lines.append(
            f"| {r['scenario']} | {r['inputs_per_request']} "
            f"| {r['throughput_rps'] if served else ''} | {r['inputs_per_s']} "
            f"| {r.get('p50_ms', '')} | {r.get('p99_ms', '')} | {r['accuracy']:.1%} "
            f"| {escalated} | {batch} "
            f"| {r.get('limit_inputs_per_s', '')} | {r.get('share_of_limit', '')} |"
        )
    lines += ["", "| target | stack | value | target | met |", "|---|---|---|---|---|"]
    for stack, figures in report["summary"].items():
        for figure in figures.values():
            if isinstance(figure, dict) and "met" in figure:
                mark = "yes" if figure["met"] else "**no**"
                lines.append(
                    f"| {figure['what']} | {stack} | {figure['value']} | {figure['target']} "
                    f"| {mark} |"
                )
    return "\n".join(lines) + "\n"
