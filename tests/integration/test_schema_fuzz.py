"""Schemathesis against the gateway's own OpenAPI document, on a real local Ray Serve, with
every check it has and a key that may use the routing overrides: no 5xx, every status and
body documented and matching, no schema-valid request refused; and every refused request
counted as rejected."""

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import steering, tiny_config, wait_for
from tiny_lm import build_tiny_lm

pytestmark = pytest.mark.integration
EXAMPLES = 60
GENERATE_EXAMPLES = 15  # each answer runs two tiny models: a few per operation


def scraped_rejected(metrics_port: int, app: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ray_protege_requests_total{")
        and 'outcome="rejected"' in line
        and f'application="{app}"' in line
    )


def refused_in_report(path: Path) -> int:
    """4xx answers to /v1/ requests in schemathesis' NDJSON event stream."""
    refused = 0
    for line in path.read_text().splitlines():
        for interaction in _interactions(json.loads(line)):
            request, response = interaction.get("request") or {}, interaction.get("response") or {}
            if "/v1/" in request.get("uri", "") and 400 <= response.get("status_code", 0) < 500:
                refused += 1
    return refused


def _interactions(event):
    if isinstance(event, dict):
        if "request" in event and "response" in event and isinstance(event["request"], dict):
            yield event
        for value in event.values():
            yield from _interactions(value)
    elif isinstance(event, list):
        for value in event:
            yield from _interactions(value)


def schemathesis(base: str, report: Path, examples: int) -> subprocess.CompletedProcess:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(Path(__file__).with_name("schemathesis.toml")),
        "run",
        f"{base}/openapi.json",
        "--url",
        base,
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {steering()[0]}",
        "--max-examples",
        str(examples),
        "--seed",
        "7",
        "--workers",
        "1",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


def check_run(base: str, app: str, tmp_path: Path, metrics_port: int, examples: int) -> None:
    report = tmp_path / "events.ndjson"
    result = schemathesis(base, report, examples)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    refused = refused_in_report(report)
    assert refused > 0  # it did send bad requests
    wait_for(lambda: scraped_rejected(metrics_port, app) >= refused or None, timeout_s=60)
    assert scraped_rejected(metrics_port, app) == refused


def test_schemathesis_finds_nothing(deploy, tiny_pair, tmp_path, serve_cluster, metrics_port):
    deploy("fuzz", tiny_config(tiny_pair, tmp_path / "log"))
    check_run(f"http://127.0.0.1:{serve_cluster}/fuzz", "fuzz", tmp_path, metrics_port, EXAMPLES)


def test_schemathesis_finds_nothing_on_a_generative_gateway(
    deploy, tmp_path, serve_cluster, metrics_port
):
    """The OpenAI-compatible routes' schema, checked like the rest, on a gateway hosting
    only a generative cascade (so /v1/classify is a documented 404 there)."""
    generate = {
        "student": {"path": str(build_tiny_lm(tmp_path / "student", seed=2))},
        "teacher": {"path": str(build_tiny_lm(tmp_path / "teacher", seed=1))},
        "threshold": 0.5,
        "max_new_tokens": 4,
        "log": {"dir": str(tmp_path / "generations"), "fsync_interval_s": 0.2},
    }
    args = {
        "generate": generate,
        "limits": {"max_inputs": 8, "max_chars": 300},
        "torch_threads": 1,
        "access": {"keys_file": str(steering()[1])},
    }
    deploy("fuzz-generate", args)
    base = f"http://127.0.0.1:{serve_cluster}/fuzz-generate"
    check_run(base, "fuzz-generate", tmp_path, metrics_port, GENERATE_EXAMPLES)
