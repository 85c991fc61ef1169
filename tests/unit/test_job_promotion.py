"""The distillation job promotes with compare-and-set: a rollback during a run stands, a
promotion whose answer was lost is still a promotion, and the watermark moves only from the
value the run read."""

from types import SimpleNamespace

import pytest

from distill.dataset import Window, read_watermark, write_watermark
from distill.job import decision_result
from distill.lock import run_lock
from serving.contracts.registry import POINTER_KEY, Registry
from serving.contracts.storage import StorageError
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


@pytest.fixture(params=["folder", "s3"])
def root(request, tmp_path) -> str:
    """A registry root: a folder, or a prefix on the session's real S3 server (moto)."""
    if request.param == "folder":
        return str(tmp_path / "reg")
    return str(request.getfixturevalue("s3_uri"))


def test_a_promotion_whose_answer_was_lost_is_a_promotion_and_consumes_its_window(
    root, tmp_path, monkeypatch
):
    registry = Registry(root, cache_dir=tmp_path / "cache")
    for v in ("seed", "candidate"):
        registry.publish(staged_version(tmp_path, v))
    registry.promote("seed")
    real_update, lost = registry.store.update, []

    def lands_then_times_out(key, change):  # the conditional write lands; its answer is lost
        result = real_update(key, change)
        if key == POINTER_KEY and not lost:
            lost.append(key)
            raise StorageError(f"object store {registry.uri} did not answer within 30.0 s")
        return result

    monkeypatch.setattr(registry.store, "update", lands_then_times_out)
    window = Window(new=[], replay=[], watermark={"segment-1": 80}, read={})
    accepted = SimpleNamespace(promote=True, reason="better")
    with run_lock(registry.store) as lease:
        result = decision_result(registry, accepted, "candidate", "seed", lease, window)
    assert lost and result == ("promoted", "better")
    assert registry.current() == "candidate" and registry.history() == ["seed"]
    assert read_watermark(registry.store) == {"segment-1": 80}


def test_a_watermark_moved_by_another_run_is_left_as_it_is(tmp_path):
    registry = registry_with(tmp_path, "seed", "candidate")
    registry.promote("seed")
    write_watermark(registry.store, {"segment-1": 150}, read={})  # another run consumed
    window = Window(new=[], replay=[], watermark={"segment-1": 120}, read={})  # read before
    refused = SimpleNamespace(promote=False, reason="no drop")
    result, reason = decision_result(registry, refused, "candidate", "seed", window=window)
    assert result == "rejected" and "the watermark moved since this run read it" in reason
    assert read_watermark(registry.store) == {"segment-1": 150}


def test_a_registry_store_that_cannot_be_reached_is_an_error_naming_it(tmp_path):
    from distill.config import DistillConfig
    from distill.job import run
    from serving.contracts.storage import StorageError

    config = DistillConfig(
        registry="s3://protege-unreachable/registry",
        log_dir="s3://protege-unreachable/escalations",
        teacher=tmp_path,
        s3_endpoint="http://127.0.0.1:9",
        work_dir=tmp_path / "work",
    )
    with pytest.raises(StorageError, match="s3://protege-unreachable/registry"):
        run(config)
