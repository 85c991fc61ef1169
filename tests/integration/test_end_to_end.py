"""The real default-model code path end to end, on the lighter ``lite`` pair so CI stays fast:
real MiniLM weights and real BBC data, built by `protege models build --profile lite`
(MiniLM teacher, 2-layer MiniLM student), then served from deploy/serve_config.yaml."""

from pathlib import Path

import pytest
from conftest import steering

from protege.bbc import LABELS
from protege.default_models import build_defaults
from protege.gateway_process import load_serve_config
from serving.contracts.manifest import read_manifest
from serving.contracts.records import iter_records

pytestmark = pytest.mark.integration


def test_build_writes_a_report_and_is_idempotent(lite_cache):
    report = build_defaults(lite_cache, "lite")
    figures = report["figures"]
    assert figures["gold_texts"] > 300 and figures["traffic_texts"] == 300
    assert (
        0.2 < figures["student_gold_accuracy"] <= 1 and 0.2 < figures["teacher_gold_accuracy"] <= 1
    )
    assert report["labels"] == LABELS and report["task"] == "bbc-news"
    weights = lite_cache / "models" / "student" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_defaults(lite_cache, "lite") == report
    assert weights.stat().st_mtime_ns == before  # nothing retrained
    split = (lite_cache / "data" / "split.json").read_text()
    assert "sha256" in split and "BBC copyright" in split


def test_default_models_serve_from_the_shipped_config(lite_cache, deploy, tmp_path):
    config = load_serve_config(
        Path("deploy/serve_config.yaml"),
        lite_cache,
        log={"dir": str(tmp_path / "log")},
        registry=str(tmp_path / "registry"),  # empty: the student folder serves
        access={"keys_file": str(steering()[1])},  # the test forces the teacher tier
    )
    client = deploy("defaults", config["applications"][0]["args"])
    student = read_manifest(lite_cache / "models" / "student")
    assert student is not None and student.calibration is not None
    assert student.default_target is not None
    models = client.model().protege
    assert models.student.version == student.version
    assert "calibrated for teacher agreement" in models.threshold_rule
    assert models.threshold == pytest.approx(
        student.calibration.threshold(
            "max_prob", target_agreement=student.default_target.target_agreement
        )
    )
    texts = ["Chancellor unveils budget tax cuts", "Arsenal beat Chelsea in cup"]
    result = client.classify(texts, force_tier="teacher", request_id="e2e")
    assert all(o.label in LABELS and o.tier == "teacher" for o in result.outputs)
    records = list(iter_records(tmp_path / "log"))
    assert sorted(r.text for r in records) == sorted(texts)
    assert {r.request_id for r in records} == {"e2e"} and {r.reason for r in records} == {"forced"}
