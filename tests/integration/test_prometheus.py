"""Metrics proven against a real Prometheus (Debian's package) scraping the real Ray metrics
port of a real local Ray Serve app hosting both kinds of cascade, plus a real Pushgateway
for the distillation job."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from conftest import auth, free_port, steering, tiny_config, wait_for
from ray import serve
from tiny_lm import build_tiny_lm
from tiny_models import LABELS, build_tiny

from distill import metrics as distill_metrics
from protege.gateway_process import with_student
from serving import local_ray
from serving.app import build_app
from serving.client import ProtegeClient
from serving.contracts.manifest import ModelManifest, weights_digest, write_manifest
from serving.contracts.registry import Registry

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "protege.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
APP = "metrics"
GENERATE = "chat:tiny"


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(
            f"{binary} is not installed: `make install` installs Debian's prometheus packages"
        )
    return path


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    port = free_port()
    # its own persistence file: Debian's build persists in /var/lib/prometheus by default,
    # which would carry groups over from earlier runs
    persistence = tmp_path_factory.mktemp("pushgateway") / "pushgateway.data"
    proc = subprocess.Popen(
        [
            need("prometheus-pushgateway"),
            f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={persistence}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: _ok(f"http://127.0.0.1:{port}/-/ready"), timeout_s=30)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, metrics_port, serve_cluster, pushgateway):
    folder = tmp_path_factory.mktemp("prometheus")
    shutil.copy(RULES, folder / "rules.yml")
    config = {
        # the scrape timeout is the interval (Prometheus's default caps it at 10 s): Ray's
        # metrics page is large, and a scrape that times out marks every series stale, so
        # on a loaded machine a 1 s timeout made whole metrics vanish from instant queries
        "global": {"scrape_interval": "3s", "scrape_timeout": "3s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [
            {
                "job_name": "protege-ray",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            },
            {
                "job_name": "protege-distill",
                "honor_labels": True,
                "static_configs": [{"targets": [pushgateway]}],
            },
        ],
    }
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        [
            need("prometheus"),
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ok(f"{url}/-/ready"), timeout_s=60)
    yield url
    proc.terminate()
    proc.wait(10)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(prometheus: str, expr: str) -> list[dict]:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


def scalar(prometheus: str, expr: str) -> float | None:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else None


def add_version(registry: Registry, tmp_path: Path, seed: int) -> str:
    staged = build_tiny(tmp_path / f"v{seed}", seed=seed, mean_pool=True)
    version = f"student-{weights_digest(staged)}"
    write_manifest(
        staged,
        ModelManifest(
            version=version,
            role="student",
            created_at=time.time(),
            labels=LABELS,
            eval={"escalation_rate": 0.2, "cascade_accuracy": 0.9},
        ),
    )
    return registry.publish(staged)


def generative_cascade(tmp: Path) -> dict:
    """A generative cascade of tiny random Llamas: the teacher is the student's weights
    scaled by 1.05, so their greedy answers share a prefix and drafts are partly accepted."""
    student = build_tiny_lm(tmp / "lm-student", seed=2)
    teacher = build_tiny_lm(tmp / "lm-teacher", seed=2, init=0.21)
    return {
        "name": GENERATE,
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "threshold": 0.0,  # kept unless steered, none audited: the counts are known
        "audit_fraction": 0.0,
        "max_prompt_tokens": 48,
        "max_new_tokens": 8,
        "log": {"dir": str(tmp / "gen-log"), "fsync_interval_s": 0.2},
    }


def generation_traffic(url: str) -> None:
    """3 kept answers, 4 greedy chats forced to the teacher (drafts verified), a streamed
    completion escalated by its threshold, a sampled chat forced to the teacher (no draft)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=steering()[0], max_retries=0, timeout=60)
    chat = client.chat.completions
    for i in range(2):
        kept = chat.create(model=GENERATE, messages=[{"role": "user", "content": f"headline {i}"}])
        assert kept.protege["tier"] == "student"
    assert client.completions.create(model=GENERATE, prompt="headline").protege["tier"] == "student"
    for i in range(4):
        forced = chat.create(
            model=GENERATE,
            messages=[{"role": "user", "content": f"generation headline {i}"}],
            extra_body={"protege": {"force_tier": "teacher"}},
        )
        assert forced.protege["draft"] == "verified", forced.protege
    stream = client.completions.create(
        model=GENERATE,
        prompt="generation headline 3",
        stream=True,
        extra_body={"protege": {"threshold": 1.0}},
    )
    assert list(stream)[-1].protege["escalated"]
    sampled = chat.create(
        model=GENERATE,
        messages=[{"role": "user", "content": "sampled headline"}],
        temperature=1.0,
        seed=7,
        extra_body={"protege": {"force_tier": "teacher"}},
    )
    assert sampled.protege["tier"] == "teacher" and sampled.protege["draft"] != "verified"


@pytest.fixture(scope="module")
def traffic(prometheus, pushgateway, serve_cluster, tiny_pair, tmp_path_factory):
    """Known traffic: 10 student-only requests, 6 forced to the teacher, 4 refused, audits of
    the kept ones, a rotated log, one hot swap, the generation traffic above on the same
    gateway, one pushed distillation run."""
    tmp = tmp_path_factory.mktemp("metrics-app")
    registry = Registry(tmp / "registry")
    first, second = add_version(registry, tmp, 31), add_version(registry, tmp, 32)
    registry.promote(first)
    args = tiny_config(
        tiny_pair,
        tmp / "log",
        registry=str(registry.root),
        cascade={"threshold": 0.5, "audit_fraction": 1.0, "audit_teacher": "online"},
        log={"dir": str(tmp / "log"), "max_segment_bytes": 3000, "fsync_interval_s": 0.2},
        generate=generative_cascade(tmp),
    )
    app = {
        "applications": [
            {
                "name": APP,
                "route_prefix": f"/{APP}",
                "import_path": "serving.app:build_app",
                "args": args,
                "deployments": [{"name": "Gateway", "user_config": {}}],
            }
        ]
    }
    local_ray.deploy_config(app, tmp)
    url = f"http://127.0.0.1:{serve_cluster}/{APP}"
    with ProtegeClient(url, api_key=steering()[0], timeout=60) as client:
        client.wait_ready(120)
        for i in range(10):
            client.classify(f"student headline {i}", force_tier="student")
        for i in range(6):
            client.classify(f"teacher headline {i}", force_tier="teacher")
        for body in (
            {"inputs": []},
            {"inputs": [" "]},
            {"inputs": ["x" * 301]},
            {"inputs": ["a"] * 9},
        ):
            assert httpx.post(f"{url}/v1/classify", json=body, headers=auth()).status_code == 422
        generation_traffic(url)
        local_ray.deploy_config(with_student(app, second), tmp)
        wait_for(lambda: client.model().protege.student.version == second, timeout_s=60)
    # a teacher that always times out: degraded answers and teacher failures
    serve.run(
        build_app(tiny_config(tiny_pair, tmp / "log2", teacher_timeout_s=0.001)),
        name=f"{APP}-degraded",
        route_prefix=f"/{APP}-degraded",
    )
    with ProtegeClient(f"{url}-degraded", api_key=steering()[0], timeout=60) as degraded:
        degraded.wait_ready(120)
        assert all(o.degraded for o in degraded.classify(["one", "two"], threshold=1.0).outputs)
    runs = tmp / "runs"
    runs.mkdir()
    report = {
        "run_id": "r1",
        "result": "promoted",
        "seconds": 12.5,
        "window": {"new_records": 400},
        "epoch_losses": [0.9, 0.5],
        "eval": {
            "current": {"escalation_rate": 0.4, "escalation_needed": 0.42},
            "candidate": {"escalation_rate": 0.2, "escalation_needed": 0.21},
        },
        "decision": {  # the gate's figure: the drop in escalation needed, and its bar
            "escalation_drop": {
                "value": 0.21,
                "low": 0.15,
                "high": 0.27,
                "sampled": 150,
                "records": 600,
            },
            "required_drop": 0.01,
        },
        "audit_agreement": {"audits": 20, "agree": 18, "disagree": 2, "ratio": 0.9},
    }
    (runs / "r1.json").write_text(json.dumps(report))
    assert distill_metrics.push(pushgateway, report, [{**report, "finished_at": time.time()}])
    # the generative job pushes after it: its own group, so the job above keeps its metrics
    generative = {"run_id": "g1", "kind": "generate", "result": "rejected", "seconds": 3.0}
    assert distill_metrics.push(pushgateway, generative, [{**generative, "finished_at": 1.0}])
    yield
    serve.delete(APP)
    serve.delete(f"{APP}-degraded")


def settles(prometheus: str, expr: str, expected: float, at_least: bool = False) -> None:
    """Poll until the query's value reaches ``expected``: Ray's metrics agent may leave a series
    out of one export (Prometheus then marks it stale until the next scrape), so one instant
    query can miss a series that the previous one saw."""
    seen: list[float | None] = [None]

    def reached() -> bool:
        seen[0] = value = scalar(prometheus, expr)
        return value is not None and (value >= expected if at_least else value == expected)

    try:
        wait_for(reached, timeout_s=90, every_s=0.5)
    except AssertionError:
        raise AssertionError(f"{expr} is {seen[0]}, expected {expected}") from None


def test_counts_match_the_traffic_sent(prometheus, traffic):
    base = f'application="{APP}"'
    settles(prometheus, f'sum(ray_protege_requests_total{{{base},outcome="ok"}})', 16)
    settles(prometheus, f'sum(ray_protege_requests_total{{{base},outcome="rejected"}})', 4)
    settles(prometheus, f'sum(ray_protege_requests_total{{{base},tier="teacher"}})', 6)
    settles(prometheus, f'sum(ray_protege_escalations_total{{{base},reason="forced"}})', 6)
    settles(
        prometheus,
        f'sum(ray_protege_escalations_total{{{base},reason!="audit"}})'
        f" / sum(ray_protege_inputs_total{{{base}}})",
        6 / 16,
    )
    settles(prometheus, f"sum(ray_protege_request_latency_seconds_count{{{base}}})", 16)
    settles(prometheus, f"sum(ray_protege_confidence_count{{{base}}})", 16)
    settles(
        prometheus,
        f'sum(ray_protege_stage_latency_seconds_count{{{base},stage="teacher"}})',
        6,
        at_least=True,
    )
    settles(prometheus, f'sum(ray_protege_hot_swaps_total{{{base},result="success"}})', 1)
    # audits of the 10 kept inputs land in the log with the 6 forced ones (16 records), the
    # 6 escalated generations in the generative cascade's own log
    settles(prometheus, f"sum(ray_protege_log_records_total{{{base}}})", 22)
    settles(prometheus, f"sum(ray_protege_log_rotations_total{{{base}}})", 1, at_least=True)
    degraded = 'application="metrics-degraded"'
    settles(prometheus, f'sum(ray_protege_inputs_total{{{degraded},outcome="degraded"}})', 2)
    settles(prometheus, f'sum(ray_protege_teacher_failures_total{{{degraded},kind="timeout"}})', 1)


def test_generation_counts_match_the_traffic_sent(prometheus, traffic):
    base = f'application="{APP}"'
    settles(prometheus, f'sum(ray_protege_generate_requests_total{{{base},tier="student"}})', 3)
    settles(prometheus, f'sum(ray_protege_generate_requests_total{{{base},tier="teacher"}})', 6)
    settles(prometheus, f'sum(ray_protege_generate_requests_total{{{base},outcome="ok"}})', 9)
    settles(prometheus, f'sum(ray_protege_generate_escalations_total{{{base},reason="forced"}})', 6)
    settles(prometheus, f'sum(ray_protege_generate_drafts_total{{{base},use="verified"}})', 5)
    settles(prometheus, f'sum(ray_protege_generate_drafts_total{{{base},use="none"}})', 1)
    settles(prometheus, f"sum(ray_protege_generate_draft_accepted_share_count{{{base}}})", 5)
    # the teacher kept some of the drafts' tokens
    shares = f"sum(ray_protege_generate_draft_accepted_share_sum{{{base}}})"
    settles(prometheus, shares, 1e-9, at_least=True)
    settles(prometheus, f"sum(ray_protege_generate_first_byte_seconds_count{{{base}}})", 9)
    settles(prometheus, f"sum(ray_protege_generate_confidence_count{{{base}}})", 9)
    # the student answered all 9 (a token at least each); the teacher wrote the draft
    # tokens it did not keep, and the sampled answer
    tokens = 'sum(ray_protege_generate_tokens_total{%s,model="%s"})'
    settles(prometheus, tokens % (base, "student"), 9, at_least=True)
    settles(prometheus, tokens % (base, "teacher"), 1, at_least=True)
    # the accepted drafts spared the teacher decode steps
    saved = f"sum(ray_protege_generate_teacher_seconds_saved_total{{{base}}})"
    settles(prometheus, saved, 1e-9, at_least=True)


def test_the_jobs_offline_audit_agreement_reaches_the_recording_rule(prometheus, traffic):
    settles(prometheus, 'sum(protege_distill_offline_audits{agreement="agree"})', 18)
    settles(prometheus, 'count(protege_distill_runs_total{kind="generate"})', 1, at_least=True)
    settles(prometheus, "protege:audit_agreement_offline:ratio", 0.9)
    # this app's audits are online (the gateway counts them): those come first
    settles(prometheus, "count(protege:audit_agreement:ratio_1h)", 1)


def test_no_metric_carries_user_text_or_request_ids(prometheus, traffic):
    wait_for(
        lambda: scalar(prometheus, f'sum(ray_protege_requests_total{{application="{APP}"}})'),
        timeout_s=90,
    )
    series = httpx.get(
        f"{prometheus}/api/v1/series", params={"match[]": '{__name__=~"ray_protege_.*"}'}
    ).json()["data"]
    values = {v for s in series for k, v in s.items()}
    assert not any("headline" in v for v in values)
    assert {k for s in series for k in s} <= {
        "__name__",
        "instance",
        "job",
        "application",
        "deployment",
        "replica",
        "tier",
        "outcome",
        "reason",
        "kind",
        "stage",
        "model",
        "le",
        "student_version",
        "teacher_version",
        "figure",
        "result",
        "agreement",
        "use",
        "Version",
        "SessionName",
        "NodeAddress",
        "Component",
        "WorkerId",
        "otel_scope_name",
    }


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def without_comparison(expr: str) -> str:
    """An alert's expression less its threshold: the part that must return series."""
    return re.split(r"\s(?:>|<|==|>=|<=)\s[\d.e*\s]+$", expr.strip())[0]


@pytest.mark.parametrize("expr", dashboard_exprs() + rule_exprs())
def test_every_dashboard_and_rule_expression_runs_and_returns_series(prometheus, traffic, expr):
    query(prometheus, expr)  # the whole expression parses
    wait_for(lambda: query(prometheus, without_comparison(expr)), timeout_s=90)


def test_dashboard_datasource_is_a_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert any(v["type"] == "datasource" for v in dashboard["templating"]["list"])
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} == {"${datasource}"}
