import logging

import pytest

from distill import metrics as distill_metrics
from serving import local_ray
from serving.metrics import SPECS


def test_a_pushgateway_that_is_down_is_a_warning_not_a_failure(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    report = {"result": "promoted", "seconds": 1.0}
    assert distill_metrics.push("127.0.0.1:9", report, [report]) is False  # nothing listens
    assert "could not push distillation metrics" in caplog.text
    assert distill_metrics.push(None, report, [report]) is False  # not configured: silent


def test_run_counts_come_from_the_run_reports(tmp_path):
    from serving.registry import Registry

    runs = Registry(tmp_path)
    for i, result in enumerate(["promoted", "rejected", "rejected", "failed"]):
        runs.write_run(f"r{i}", {"result": result, "finished_at": 100.0 + i})
    (tmp_path / "runs" / "r9.json").write_text("{torn")
    reports = runs.runs()
    assert distill_metrics.last_success(reports) == 102.0  # the last completed run
    registry = distill_metrics.collect({"result": "failed"}, reports)
    counts = {
        s.labels["result"]: s.value
        for m in registry.collect()
        if m.name == "protege_distill_runs_total"
        for s in m.samples
    }
    assert counts == {
        "promoted": 1,
        "rejected": 2,
        "failed": 1,
        "unreadable": 1,
        "superseded": 0,
        "lease-lost": 0,
        "nothing-to-do": 0,
        "not-enough-evidence": 0,
    }


def test_missing_or_bad_metrics_port_is_a_clear_error():
    with pytest.raises(ValueError, match="metrics_port is required"):
        local_ray.check_metrics_port(None)
    with pytest.raises(ValueError, match="outside 10002-19999"):
        local_ray.check_metrics_port(15000)
    local_ray.check_metrics_port(8080)


def test_metric_names_follow_prometheus_conventions():
    for spec in SPECS:
        assert spec.name.startswith("protege_")
        assert not spec.name.endswith("_total")  # Ray appends it to counters
        assert "request_id" not in spec.tags and "text" not in spec.tags
        if spec.kind == "histogram":
            assert list(spec.buckets) == sorted(spec.buckets)
        if "latency" in spec.name or "duration" in spec.name:
            assert spec.name.endswith("_seconds")


def test_a_request_updates_each_counter_once_per_tag_set_not_per_input():
    from serving.metrics import GatewayMetrics

    calls: list[tuple[str, str, float, dict]] = []

    class Recording(GatewayMetrics):
        def __init__(self):  # no Ray: record the calls instead
            pass

        def inc(self, name, value=1.0, **tags):
            calls.append(("inc", name, value, tags))

        def observe(self, name, value, **tags):
            calls.append(("observe", name, value, tags))

    tiers = ["student"] * 30 + ["teacher"] * 2
    reasons = [None] * 30 + ["low_confidence"] * 2
    Recording().request(tiers, [False] * 32, [0.9] * 32, reasons, 0.05)
    incs = [(name, value, tags) for kind, name, value, tags in calls if kind == "inc"]
    assert incs == [
        ("protege_requests", 1.0, {"tier": "mixed", "outcome": "ok"}),
        ("protege_inputs", 30, {"tier": "student", "outcome": "ok"}),
        ("protege_inputs", 2, {"tier": "teacher", "outcome": "ok"}),
        ("protege_escalations", 2, {"reason": "low_confidence"}),
    ]
