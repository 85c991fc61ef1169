"""The distillation job promotes with compare-and-set: a rollback during a run stands."""

from types import SimpleNamespace

import pytest

from distill.job import decision_result
from serving.registry import Registry
from tests.unit.test_registry import staged_version


def registry_with(tmp_path, *versions: str) -> Registry:
    registry = Registry(tmp_path / "reg")
    for v in versions:
        registry.publish(staged_version(tmp_path, v))
    return registry


def test_an_accepted_candidate_is_promoted_over_the_version_the_run_started_from(tmp_path):
    registry = registry_with(tmp_path, "seed", "candidate")
    registry.promote("seed")
    accepted = SimpleNamespace(promote=True, reason="escalation drops 10 points")
    assert decision_result(registry, accepted, "candidate", "seed") == (
        "promoted",
        "escalation drops 10 points",
    )
    assert registry.current() == "candidate"


def test_a_rollback_during_the_run_is_not_undone(tmp_path):
    registry = registry_with(tmp_path, "old", "seed", "candidate")
    registry.promote("old")
    registry.promote("seed")  # the run starts on seed ...
    registry.rollback()  # ... and an operator rolls back to old while it trains
    accepted = SimpleNamespace(promote=True, reason="better")
    result, reason = decision_result(registry, accepted, "candidate", "seed")
    assert result == "superseded" and "current is old, not seed" in reason
    assert registry.current() == "old"


def test_a_rejected_candidate_never_touches_the_pointer(tmp_path):
    registry = registry_with(tmp_path, "seed", "candidate")
    registry.promote("seed")
    refused = SimpleNamespace(promote=False, reason="no drop")
    assert decision_result(registry, refused, "candidate", "seed") == ("rejected", "no drop")
    assert registry.current() == "seed"


def test_a_registry_store_that_cannot_be_reached_is_an_error_naming_it(tmp_path):
    from distill.config import DistillConfig
    from distill.job import run
    from serving.storage import StorageError

    config = DistillConfig(
        registry="s3://protege-unreachable/registry",
        log_dir="s3://protege-unreachable/escalations",
        teacher=tmp_path,
        s3_endpoint="http://127.0.0.1:9",
        work_dir=tmp_path / "work",
    )
    with pytest.raises(StorageError, match="s3://protege-unreachable/registry"):
        run(config)
