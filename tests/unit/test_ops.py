import logging

import numpy as np
import pytest
from test_escalation_log import record

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
    from serving.contracts.registry import Registry

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
        "recalibrated": 0,
        "lease-lost": 0,
        "nothing-to-do": 0,
        "not-enough-evidence": 0,
    }


def audit(i: int, student: list[float], status: str = "skipped", labels=("a", "b", "c")):
    """An audited confident input; with ``status`` other than answered, labelled offline."""
    offline = status != "answered"
    return record(i, f"audited headline {i}", reason="audit").model_copy(
        update={
            "labels": list(labels),
            "student_probs": student,
            "teacher_status": status,
            "teacher_probs": None if offline else [0.0, 1.0, 0.0],
            "teacher_version": None if offline else "t1",
            "teacher_label": None if offline else "b",
        }
    )


class Labeller:
    """The teacher's offline labels, as ``OfflineLabels.probs`` gives them (fixed here)."""

    def __init__(self, teacher: dict[str, list[float]]) -> None:
        self.labels, self.teacher, self.asked = ["a", "b", "c"], teacher, []

    def probs(self, records):
        self.asked += [r.record_id for r in records]
        return np.asarray([self.teacher[r.record_id] for r in records])


def test_the_offline_audit_agreement_counts_only_audits_labelled_offline():
    first, second = [0.8, 0.1, 0.1], [0.1, 0.8, 0.1]
    records = [
        audit(1, first),  # the teacher says a: agree
        audit(2, first),  # the teacher says b: disagree
        audit(3, second, status="failed"),  # asked online, failed: labelled offline, agree
        audit(4, second, status="cancelled"),  # agree
        audit(5, first, status="answered"),  # the gateway counted it: left out
        audit(6, first, labels=("x", "y", "z")),  # another task's labels: left out
        record(7, "an escalation"),  # not an audit
    ]
    teacher = {"rec1": first, "rec2": second, "rec3": second, "rec4": second}
    labeller = Labeller(teacher)
    measured = distill_metrics.offline_audit_agreement(records, labeller)
    assert measured == {"audits": 4, "agree": 3, "disagree": 1, "ratio": 0.75}
    assert sorted(labeller.asked) == ["rec1", "rec2", "rec3", "rec4"]
    none = distill_metrics.offline_audit_agreement([records[4], records[6]], labeller)
    assert none == {"audits": 0, "agree": 0, "disagree": 0, "ratio": None}


def gauges(registry, name: str) -> dict[str, float]:
    return {
        s.labels.get("agreement", ""): s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == name
    }


def test_the_last_measured_audit_agreement_is_pushed_after_runs_that_measure_none():
    measured = {"audits": 40, "agree": 36, "disagree": 4, "ratio": 0.9}
    reports = [
        {"result": "rejected", "finished_at": 100.0, "audit_agreement": {**measured, "agree": 1}},
        {"result": "promoted", "finished_at": 200.0, "audit_agreement": measured},
        {"result": "rejected", "finished_at": 300.0, "audit_agreement": {"audits": 0}},
        {"result": "nothing-to-do", "finished_at": 400.0},
    ]
    registry = distill_metrics.collect(reports[-1], reports)
    assert gauges(registry, "protege_distill_offline_audits") == {"agree": 36, "disagree": 4}
    stamp = gauges(registry, "protege_distill_offline_audits_timestamp_seconds")
    assert stamp == {"": 200.0}  # when it was measured, so a dashboard can tell its age
    never = distill_metrics.collect(reports[-1], reports[-2:])
    assert gauges(never, "protege_distill_offline_audits") == {}  # nothing measured: no series


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
            assert all(b > 0 for b in spec.buckets), spec.name  # Ray refuses 0 and below
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
