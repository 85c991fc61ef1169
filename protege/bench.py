"""``protege bench``: teacher-only, student-only and the cascade on the same Ray Serve stack,
and the same student on plain uvicorn, side by side in one run on the default models.

Writes ``bench.json`` and ``bench.md`` into the output folder and prints the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from protege import bbc
from protege.default_models import build_defaults
from protege.gateway_process import load_serve_config, running_gateway
from protege.traffic import Run, send
from serving.access import steering_key
from serving.client import ProtegeClient
from serving.schemas import Tier

BENCH_PORT, PLAIN_PORT = 8200, 8300


def _row(name: str, run: Run, gold: list[str], inputs_per_request: int = 1) -> dict[str, Any]:
    labels = [o.label if o else None for o in run.outputs]
    return {
        "scenario": name,
        "requests": len(run.latency_s),
        "inputs_per_request": inputs_per_request,
        "failed": run.failures,
        "throughput_rps": round(run.throughput, 1),
        "inputs_per_s": round(run.throughput * inputs_per_request, 1),
        "p50_ms": round(run.latency_ms(None, 50), 2),
        "p99_ms": round(run.latency_ms(None, 99), 2),
        "accuracy": round(float(np.mean([a == b for a, b in zip(labels, gold, strict=True)])), 4),
        "escalation_rate": round(float(np.mean([bool(o and o.escalated) for o in run.outputs])), 4),
    }


def _scenarios(
    url: str, key: str, texts: list[str], gold: list[str], concurrency: int, tag: str
) -> list[dict[str, Any]]:
    rows = []
    plan: list[tuple[str, Tier | None, int]] = [
        ("student-only", "student", 1),
        ("cascade", None, 1),
        ("teacher-only", "teacher", 1),
        ("student-only, 32 inputs/request", "student", 32),
    ]
    for name, tier, batch in plan:
        warm_up = texts[: concurrency * 2]
        send(url, warm_up, concurrency=concurrency, force_tier=tier, api_key=key)
        run = send(url, texts, concurrency=concurrency, force_tier=tier, batch=batch, api_key=key)
        rows.append(_row(f"{name} ({tag})", run, gold, batch) | {"stack": tag})
    return rows


def _plain_uvicorn(
    cache: Path, texts: list[str], gold: list[str], concurrency: int
) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Ray gives each replica one thread too
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "protege.plain_student",
            "--model",
            str(cache / "models" / "student"),
            "--port",
            str(PLAIN_PORT),
        ],
        env=env,
    )
    try:
        with ProtegeClient(f"http://127.0.0.1:{PLAIN_PORT}") as client:
            client.wait_ready(120)
        url = f"http://127.0.0.1:{PLAIN_PORT}"
        send(url, texts[: concurrency * 2], concurrency=concurrency)
        return _row(
            "student-only (plain uvicorn, no Ray)", send(url, texts, concurrency=concurrency), gold
        ) | {"stack": "uvicorn"}
    finally:
        server.terminate()
        server.wait(30)


def run_bench(
    cache: Path, config_path: Path, requests: int, concurrency: int, out: Path, ingress: str
) -> dict[str, Any]:
    build_defaults(cache)
    pool = bbc.read_split(cache / "data", "holdout") + bbc.read_split(cache / "data", "stream")
    examples = [pool[i % len(pool)] for i in range(requests)]
    texts, gold = [e.text for e in examples], [e.label for e in examples]
    key, keys_file = steering_key(out.resolve())  # the rows that force a tier use it
    config = load_serve_config(
        config_path,
        cache,
        cascade={"audit_fraction": 0.0},
        log={"dir": str(out / "escalations")},
        access={"keys_file": str(keys_file)},
    )
    rows = [_plain_uvicorn(cache, texts, gold, concurrency)]
    for mode in ["proxy", "haproxy"] if ingress == "both" else [ingress]:
        began = time.perf_counter()
        with running_gateway(config, port=BENCH_PORT, ingress=mode) as url:  # type: ignore[arg-type]
            rows += _scenarios(url, key, texts, gold, concurrency, f"Serve, {mode}")
        print(
            f"{mode}: whole stack up, measured and shut down in {time.perf_counter() - began:.0f} s"
        )
    summary = _summary(rows)
    report = {
        "requests": requests,
        "concurrency": concurrency,
        "rows": rows,
        "summary": summary,
        "machine": {"cpus": os.cpu_count()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(rows))
    print("\n" + markdown(rows))
    return report


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["scenario"]: r for r in rows}
    plain = by["student-only (plain uvicorn, no Ray)"]["throughput_rps"]
    summary: dict[str, Any] = {}
    for stack in sorted({r["stack"] for r in rows if r["stack"] != "uvicorn"}):
        student, cascade, teacher = (
            by[f"{n} ({stack})"] for n in ("student-only", "cascade", "teacher-only")
        )
        summary[stack] = {
            "student_vs_plain_uvicorn_throughput": round(student["throughput_rps"] / plain, 3),
            "cascade_vs_teacher_throughput": round(
                cascade["throughput_rps"] / teacher["throughput_rps"], 3
            ),
            "cascade_accuracy_gap_to_teacher": round(teacher["accuracy"] - cascade["accuracy"], 4),
        }
    return summary


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| scenario | req/s | inputs/s | p50 ms | p99 ms | accuracy | escalated | failed |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['throughput_rps']} | {r['inputs_per_s']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['accuracy']:.1%} | {r['escalation_rate']:.1%} | {r['failed']} |"
        )
    return "\n".join(lines) + "\n"
