"""The storage promises, on a local folder and on a real S3-compatible server (moto):
whole-object writes, create-only objects that are never rewritten, compare-and-set."""

import threading

import pytest

from serving.contracts.storage import LocalStore, ObjectStore, StorageError, open_store


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_uri"))


def test_read_write_list(store):
    assert store.read("a/b.json") is None and store.list("a") == []
    store.write("a/b.json", b"1")
    store.write("a/b.json", b"2")
    store.write("a/c/d.txt", b"x")
    assert store.read("a/b.json") == b"2"
    assert store.list("a") == ["a/b.json", "a/c/d.txt"]
    assert store.list("") == ["a/b.json", "a/c/d.txt"]


def test_an_object_made_by_create_is_never_rewritten(store):
    assert store.create("segment", b"first") is True
    assert store.create("segment", b"second") is False
    assert store.read("segment") == b"first"


def test_concurrent_updates_lose_nothing(store):
    def add_one(old: bytes | None) -> bytes:
        return str(int(old or b"0") + 1).encode()

    def worker() -> None:
        for _ in range(10):
            store.update("counter", add_one)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.read("counter") == b"40"


def test_the_server_refuses_stale_and_existing_writes(s3_uri):
    """What compare-and-set rests on, asked of the server directly (no timing involved)."""
    store = open_store(s3_uri)
    assert isinstance(store, ObjectStore)
    store.write("p", b"v1")
    _, etag = store._tagged("p")
    store.write("p", b"v2")  # the ETag read above is now stale
    assert store._put_if("p", b"v3", IfMatch=etag) is False
    assert store._put_if("p", b"v3", IfNoneMatch="*") is False
    assert store.read("p") == b"v2"
    store.check_conditional_writes()  # the start-up probe agrees, and leaves nothing behind
    assert store.list("") == ["p"]


def test_matches_tells_our_own_write_from_another(store):
    store.create("k", b"ours")
    assert store.matches("k", b"ours") and not store.matches("k", b"theirs")
    assert not store.matches("absent", b"ours")


def test_an_update_that_changes_nothing_writes_nothing(store):
    assert store.update("absent", lambda old: None) is None
    assert store.read("absent") is None


def test_upload_and_download(store, tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\0" * 1000)
    store.upload(source, "v/weights.bin")
    store.download("v/weights.bin", tmp_path / "back" / "weights.bin")
    assert (tmp_path / "back" / "weights.bin").read_bytes() == source.read_bytes()


def test_an_unreachable_store_is_a_clear_error_naming_it(s3_server):
    dead = ObjectStore("s3://protege-nowhere/x", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="s3://protege-nowhere/x"):
        dead.check()
    missing = ObjectStore("s3://protege-no-such-bucket/x", s3_server.endpoint)
    with pytest.raises(StorageError, match="s3://protege-no-such-bucket/x"):
        missing.check()


def test_unknown_schemes_are_refused():
    with pytest.raises(StorageError, match="only local folders and s3://"):
        open_store("gs://bucket/x")


def test_a_store_that_stops_answering_is_an_error_within_the_deadline(
    s3_uri, s3_server, monkeypatch
):
    from serving.contracts import storage

    store = open_store(s3_uri, attempts=1)
    store.write("a", b"1")  # at the usual deadline: a loaded machine may take seconds
    monkeypatch.setattr(storage, "REQUEST_TIMEOUT_S", 2.0)
    s3_server.pause()  # accepts connections, never answers
    try:
        with pytest.raises(StorageError, match=r"did not answer within 2\.0"):
            store.create("b", b"2")
    finally:
        s3_server.resume()
        monkeypatch.undo()
    assert store.read("a") == b"1"  # and the store is usable again


def test_configs_take_a_path_or_a_uri_for_a_store(tmp_path):
    from distill.config import DistillConfig
    from serving.config import LogConfig

    job = DistillConfig(registry=tmp_path / "r", log_dir="s3://b/log", teacher=tmp_path)
    assert job.registry == str(tmp_path / "r") and job.log_dir == "s3://b/log"
    assert LogConfig(ship_to=tmp_path / "shipped").ship_to == str(tmp_path / "shipped")
