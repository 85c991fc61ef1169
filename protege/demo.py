"""``make demo``: the embedded default models behind the gateway, real traffic, one table."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from distill import bbc
from distill.defaults import build_defaults
from protege.gateway_process import load_serve_config, running_gateway
from protege.traffic import Run, send


def _accuracy(run: Run, examples: list[bbc.Example]) -> float:
    right = [
        o is not None and o.label == e.label for o, e in zip(run.outputs, examples, strict=True)
    ]
    return float(np.mean(right))


def _escalation_rate(run: Run) -> float:
    return float(np.mean([o is not None and o.escalated for o in run.outputs]))


def run_demo(
    cache: Path, config_path: Path, stream_size: int, concurrency: int, port: int, out: Path
) -> dict[str, Any]:
    build = build_defaults(cache)
    data = cache / "data"
    holdout = bbc.read_split(data, "holdout")
    stream = bbc.read_split(data, "stream") + random.Random(3).sample(
        bbc.read_split(data, "stream_sentences"),
        max(0, stream_size - len(bbc.read_split(data, "stream"))),
    )
    stream = stream[:stream_size]
    # the demo's own log: its forced holdout passes must never become training data
    config = load_serve_config(config_path, cache, log={"dir": str(out / "escalations")})
    with running_gateway(config, port=port) as url:
        print(
            f"gateway ready at {url}; sending {len(stream)} stream inputs with {concurrency} clients"
        )
        traffic = send(url, [e.text for e in stream], concurrency=concurrency)
        print(f"sending {len(holdout)} holdout headlines three ways: student, teacher, cascade")
        texts = [e.text for e in holdout]
        student = send(url, texts, concurrency=concurrency, force_tier="student")
        teacher = send(url, texts, concurrency=concurrency, force_tier="teacher")
        cascade = send(url, texts, concurrency=concurrency)
    student_wrong = [
        o is None or o.label != e.label for o, e in zip(student.outputs, holdout, strict=True)
    ]
    report = {
        "models": {"student": build["student"], "teacher": build["teacher"]},
        "holdout_headlines": len(holdout),
        "accuracy": {
            "student": _accuracy(student, holdout),
            "teacher": _accuracy(teacher, holdout),
            "cascade": _accuracy(cascade, holdout),
        },
        "holdout_escalation_rate": _escalation_rate(cascade),
        "oracle_escalation_rate": float(np.mean(student_wrong)),
        "stream": {
            "inputs": len(stream),
            "concurrency": concurrency,
            "escalation_rate": _escalation_rate(traffic),
            "degraded": sum(1 for o in traffic.outputs if o is not None and o.degraded),
            "failed_requests": traffic.failures,
            "throughput_rps": traffic.throughput,
            "latency_ms": {
                tier: {"p50": traffic.latency_ms(tier, 50), "p99": traffic.latency_ms(tier, 99)}
                for tier in ("student", "teacher")
            },
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwritten: {out / 'demo.json'}")
    return report


def print_table(report: dict[str, Any]) -> None:
    acc, stream = report["accuracy"], report["stream"]
    lat = stream["latency_ms"]
    rows = [
        ("student alone: holdout accuracy", f"{acc['student']:.1%}"),
        ("teacher alone: holdout accuracy", f"{acc['teacher']:.1%}"),
        ("cascade: holdout accuracy", f"{acc['cascade']:.1%}"),
        ("cascade: holdout escalation rate", f"{report['holdout_escalation_rate']:.1%}"),
        ("oracle escalation rate (student's errors)", f"{report['oracle_escalation_rate']:.1%}"),
        (
            f"stream: escalation rate ({stream['inputs']} inputs)",
            f"{stream['escalation_rate']:.1%}",
        ),
        (
            "stream: latency student p50 / p99",
            f"{lat['student']['p50']:.1f} / {lat['student']['p99']:.1f} ms",
        ),
        (
            "stream: latency teacher p50 / p99",
            f"{lat['teacher']['p50']:.1f} / {lat['teacher']['p99']:.1f} ms",
        ),
        (
            f"stream: throughput ({stream['concurrency']} clients)",
            f"{stream['throughput_rps']:.1f} req/s",
        ),
        (
            "stream: failed requests / degraded answers",
            f"{stream['failed_requests']} / {stream['degraded']}",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n{'figure':<{width}} | value\n{'-' * width}-|-{'-' * 18}")
    for name, value in rows:
        print(f"{name:<{width}} | {value}")
