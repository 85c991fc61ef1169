"""The registry and the run lease on a real S3-compatible server (moto): versions appear
whole or not at all, downloads are checked file by file, the pointer and the lease move
only by compare-and-set (conditional writes, which the test server honours: see
test_storage)."""

import json
import multiprocessing
import time

import pytest
from test_registry import staged_version

from distill.lock import LockedError, run_lock
from serving.contracts.registry import COMPLETE_NAME, CorruptVersion, Registry, RegistryError
from serving.contracts.storage import open_store


def registry_at(uri, tmp_path, **kwargs) -> Registry:
    return Registry(uri, cache_dir=tmp_path / "cache", **kwargs)


def test_publish_promote_rollback_and_download(s3_uri, tmp_path):
    registry = registry_at(s3_uri, tmp_path)
    assert registry.current() is None and registry.versions() == []
    for v in ("v1", "v2"):
        registry.publish(staged_version(tmp_path, v))
        registry.promote(v, expected=registry.current())
    assert registry.current() == "v2" and registry.history() == ["v1"]
    assert [m.version for m in registry.versions()] == ["v1", "v2"]
    folder = registry.path("v2")  # downloaded and checked
    assert folder.is_relative_to(tmp_path / "cache")
    assert (folder / "model.safetensors").read_bytes() == b"v2"
    assert registry.rollback(expected="v2") == "v1"
    with pytest.raises(RegistryError, match="already exists; versions are immutable"):
        (tmp_path / "again").mkdir()
        registry.publish(staged_version(tmp_path / "again", "v1"))


def test_a_version_uploaded_in_part_does_not_exist(s3_uri, tmp_path):
    registry = registry_at(s3_uri, tmp_path)
    staged = staged_version(tmp_path, "v1")
    store = open_store(s3_uri)
    for name in ("model.safetensors", "protege.json"):  # ...and the uploader dies here
        store.upload(staged / name, f"versions/v1/{name}")
    assert registry.versions() == [] and not registry.exists("v1")
    with pytest.raises(RegistryError, match="not in"):
        registry.promote("v1")
    registry.publish(staged)  # a retry publishes it whole
    assert [m.version for m in registry.versions()] == ["v1"]


@pytest.mark.parametrize("victim", ["model.safetensors", "protege.json", "tokenizer.json"])
def test_a_download_that_does_not_match_its_hashes_is_refused(s3_uri, tmp_path, victim):
    refused: list[str] = []
    registry = registry_at(s3_uri, tmp_path, on_refused=refused.append)
    staged = staged_version(tmp_path, "v1")
    (staged / "tokenizer.json").write_text('{"vocab": 1}')
    registry.publish(staged)
    store = open_store(s3_uri)
    store.write(f"versions/v1/{victim}", b"tampered")  # corrupted in the store
    with pytest.raises(CorruptVersion, match=f"{victim} do not match"):
        registry.path("v1")
    assert refused == ["v1"] and not (tmp_path / "cache" / "v1").exists()
    with pytest.raises(CorruptVersion):  # not downloaded again at once
        registry.path("v1")
    assert refused == ["v1"]


def test_the_marker_lists_every_file_with_its_hash(s3_uri, tmp_path):
    registry = registry_at(s3_uri, tmp_path)
    staged = staged_version(tmp_path, "v1")
    (staged / "config.json").write_text("{}")
    registry.publish(staged)
    marker = json.loads(open_store(s3_uri).read(f"versions/v1/{COMPLETE_NAME}") or b"")
    assert sorted(marker["files"]) == ["config.json", "model.safetensors", "protege.json"]
    assert len(marker["digest"]) == 64


def _contend(uri: str, host: str, start: float, results, environment: dict) -> None:
    import os

    os.environ.update(environment)
    while time.time() < start:
        time.sleep(0.001)
    try:
        with run_lock(open_store(uri), host=host):
            results.put(host)
            time.sleep(1.5)  # the run
    except LockedError:
        results.put("refused")


def test_two_runs_started_at_once_on_different_machines_exactly_one_runs(s3_uri, s3_server):
    results: multiprocessing.Queue = multiprocessing.Queue()
    start = time.time() + 2.0
    environment = s3_server.environment()
    runs = [
        multiprocessing.Process(target=_contend, args=(s3_uri, h, start, results, environment))
        for h in ("node-a", "node-b", "node-c")
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in runs)
    assert outcomes.count("refused") == 2 and len(set(outcomes) - {"refused"}) == 1
    assert open_store(s3_uri).read("distill.lock") == b""  # released by the one that ran


class LostAnswers:
    """Wraps a store: the first ``n`` conditional writes land but their answer is lost (the
    caller sees an error, as after a timeout or a dropped connection, and retries)."""

    def __init__(self, store, n: int = 1) -> None:
        self.store, self.n = store, n
        self._real = store._put_if
        store._put_if = self._put_if

    def _put_if(self, key, data, **condition):
        landed = self._real(key, data, **condition)
        if self.n > 0 and landed:
            self.n -= 1
            raise OSError("connection reset after the write")
        return landed


def test_a_pointer_move_whose_answer_was_lost_is_not_applied_twice(s3_uri, tmp_path):
    registry = registry_at(s3_uri, tmp_path)
    for v in ("v1", "v2", "v3"):
        registry.publish(staged_version(tmp_path, v))
        registry.promote(v)
    wrapped = LostAnswers(registry.store)
    assert registry.rollback() == "v2"  # landed, answer lost: the pointer's move id says so
    assert wrapped.n == 0 and registry.current() == "v2"
    retry = registry_at(s3_uri, tmp_path)
    assert retry.rollback(expected="v2") == "v1"  # the next rollback starts where it landed
    wrapped = LostAnswers(retry.store)
    original_update = retry.store.update

    def update_retrying(key, change):  # a caller that retries the same move once
        try:
            return original_update(key, change)
        except OSError:
            return original_update(key, change)

    retry.store.update = update_retrying
    retry.promote("v3", expected="v1")  # landed, answer lost, retried with the same move id
    assert wrapped.n == 0 and retry.current() == "v3" and retry.history() == ["v1"]


def test_a_publish_whose_answers_were_lost_still_publishes(s3_uri, tmp_path):
    registry = registry_at(s3_uri, tmp_path)
    store = registry.store
    real_create = store.create
    calls = {"n": 0}

    def create_then_forget(key, data):  # every create lands; the first two answers say no
        landed = real_create(key, data)
        calls["n"] += 1
        return landed if calls["n"] > 2 else False

    store.create = create_then_forget
    registry.publish(staged_version(tmp_path, "v1"))
    assert [m.version for m in registry.versions()] == ["v1"]
    assert registry.path("v1").is_dir()


def test_an_unfinished_version_is_never_finished_with_other_files(s3_uri, tmp_path):
    registry = registry_at(s3_uri, tmp_path)
    store = open_store(s3_uri)
    dead = staged_version(tmp_path / "dead", "v1")
    for name in ("model.safetensors", "protege.json"):  # a publish that died before its marker
        store.upload(dead / name, f"versions/v1/{name}")
    other = staged_version(tmp_path / "other", "v1")
    (other / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(RegistryError, match="exists with other content"):
        registry.publish(other)
    assert not registry.exists("v1")


def _download(uri: str, cache: str, version: str, environment: dict, results) -> None:
    import os

    os.environ.update(environment)
    try:
        folder = Registry(uri, cache_dir=cache).path(version)
        results.put((folder / "model.safetensors").read_bytes())
    except Exception as exc:
        results.put(repr(exc))


def test_two_replicas_downloading_into_one_cache_both_get_the_whole_version(
    s3_uri, s3_server, tmp_path
):
    registry = registry_at(s3_uri, tmp_path)
    for i in range(3):
        registry.publish(staged_version(tmp_path, f"v{i}"))
    results: multiprocessing.Queue = multiprocessing.Queue()
    cache = str(tmp_path / "shared-cache")
    environment = s3_server.environment()
    procs = [
        multiprocessing.Process(
            target=_download, args=(s3_uri, cache, f"v{i % 3}", environment, results)
        )
        for i in range(6)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    got = sorted(results.get(timeout=5) for _ in procs)
    assert got == sorted([b"v0", b"v1", b"v2"] * 2)
