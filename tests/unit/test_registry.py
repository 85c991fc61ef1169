import json
import os
import time

import pytest

from serving.contracts.manifest import ModelManifest, write_manifest
from serving.contracts.registry import Registry, RegistryError


def staged_version(root, version: str):
    folder = root / "staging" / version
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(version.encode())
    write_manifest(
        folder, ModelManifest(version=version, role="student", created_at=time.time(), labels=["a"])
    )
    return folder


def test_publish_promote_and_rollback(tmp_path):
    registry = Registry(tmp_path / "reg")
    assert registry.current() is None and registry.versions() == []
    for v in ("v1", "v2", "v3"):
        registry.publish(staged_version(tmp_path, v))
        registry.promote(v)
    assert registry.current() == "v3" and registry.history() == ["v1", "v2"]
    assert [m.version for m in registry.versions()] == ["v1", "v2", "v3"]
    assert registry.rollback() == "v2" and registry.current() == "v2"
    assert registry.rollback() == "v1"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()


def test_versions_are_immutable_and_unknown_ones_are_named(tmp_path):
    registry = Registry(tmp_path / "reg")
    registry.publish(staged_version(tmp_path, "v1"))
    (tmp_path / "again").mkdir()
    with pytest.raises(RegistryError, match="already exists; versions are immutable"):
        registry.publish(staged_version(tmp_path / "again", "v1"))
    with pytest.raises(RegistryError, match=r"version 'v9' is not in .* \(known: v1\)"):
        registry.promote("v9")


def test_crash_between_publish_and_pointer_move_keeps_the_old_current(tmp_path):
    registry = Registry(tmp_path / "reg")
    registry.publish(staged_version(tmp_path, "v1"))
    registry.promote("v1")
    registry.publish(staged_version(tmp_path, "v2"))  # ...and the process dies here
    assert Registry(tmp_path / "reg").current() == "v1"


def test_pointer_write_is_atomic_even_when_rename_fails(tmp_path, monkeypatch):
    registry = Registry(tmp_path / "reg")
    for v in ("v1", "v2"):
        registry.publish(staged_version(tmp_path, v))
    registry.promote("v1")
    before = (tmp_path / "reg" / "current.json").read_text()

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        registry.promote("v2")
    monkeypatch.undo()
    assert (tmp_path / "reg" / "current.json").read_text() == before
    assert json.loads(before)["version"] == "v1"


def test_publish_refuses_a_folder_without_manifest(tmp_path):
    (tmp_path / "bare").mkdir()
    with pytest.raises(RegistryError, match=r"no protege\.json"):
        Registry(tmp_path / "reg").publish(tmp_path / "bare")


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".hidden", "x" * 129, "v..1", "a b"])
def test_version_ids_that_would_leave_the_registry_are_refused(tmp_path, bad):
    registry = Registry(tmp_path)
    with pytest.raises(RegistryError, match="not valid"):
        registry.path(bad)


def test_promotion_is_compare_and_set(tmp_path):
    from serving.contracts.registry import PointerMoved

    registry = Registry(tmp_path / "reg")
    for v in ("v1", "v2", "v3"):
        registry.publish(staged_version(tmp_path, v))
    registry.promote("v1", expected=None)  # an empty registry expects nothing
    registry.promote("v2", expected="v1")
    # a run started on v2; meanwhile an operator rolls back to v1
    registry.rollback(expected="v2")
    with pytest.raises(PointerMoved, match="current is v1, not v2"):
        registry.promote("v3", expected="v2")  # the run must not undo the rollback
    assert registry.current() == "v1" and registry.history() == []
    with pytest.raises(PointerMoved):
        registry.rollback(expected="v3")
    registry.promote("v3")  # an explicit command without expected still moves it


@pytest.fixture(params=["folder", "s3"])
def root(request, tmp_path) -> str:
    """A registry root: a folder, or a prefix on the session's real S3 server (moto)."""
    if request.param == "folder":
        return str(tmp_path / "reg")
    return str(request.getfixturevalue("s3_uri"))


def test_concurrent_compare_and_set_promotions_let_exactly_one_through(root, tmp_path):
    import threading

    from serving.contracts.registry import PointerMoved

    registry = Registry(root)
    versions = [f"v{i}" for i in range(9)]
    for v in versions:
        registry.publish(staged_version(tmp_path, v))
    registry.promote("v0")
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def run(version: str) -> None:
        start.wait()
        try:
            Registry(root).promote(version, expected="v0")
            outcomes.append(version)
        except PointerMoved:
            outcomes.append("moved")

    threads = [threading.Thread(target=run, args=(v,)) for v in versions[1:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "moved"]
    assert len(winners) == 1 and registry.current() == winners[0]
    assert registry.history() == ["v0"]


def test_the_cli_promotes_and_rolls_back_only_when_told_what_it_expects(tmp_path, capsys):
    from protege.cli import main

    registry = Registry(tmp_path / "reg")
    for v in ("v1", "v2"):
        registry.publish(staged_version(tmp_path, v))
    registry.promote("v1")
    root = str(tmp_path / "reg")
    assert main(["registry", "--registry", root, "promote", "v2", "--expected", "v9"]) == 2
    assert "current is v1, not v9" in capsys.readouterr().err
    assert main(["registry", "--registry", root, "promote", "v2", "--expected", "v1"]) == 0
    assert main(["registry", "--registry", root, "rollback", "--expected", "v2"]) == 0
    assert registry.current() == "v1"


def test_a_publish_that_died_before_its_marker_is_finished_by_a_retry(root, tmp_path, monkeypatch):
    """As ``protege optimize`` retries: the same files, staged afresh with a later
    ``created_at``, after a publish that died once its files (manifest too) were written."""
    from pathlib import Path

    from serving.contracts.registry import COMPLETE_NAME, file_hashes

    registry = Registry(root, cache_dir=tmp_path / "cache")
    first = staged_version(tmp_path / "first", "v1-onnx")
    (first / "tokenizer.json").write_text('{"vocab": 1}')
    killed: list[str] = []
    real_write_text, real_create = Path.write_text, registry.store.create

    def write_text(path, *args, **kwargs):  # a folder registry writes the marker so
        if path.name == COMPLETE_NAME and not killed:
            killed.append(str(path))
            raise OSError("killed before the marker")
        return real_write_text(path, *args, **kwargs)

    def create(key, data):  # an object store creates it so
        if key.endswith(COMPLETE_NAME) and not killed:
            killed.append(key)
            raise OSError("killed before the marker")
        return real_create(key, data)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(registry.store, "create", create)
    with pytest.raises(OSError, match="killed before the marker"):
        registry.publish(first)
    assert killed and not registry.exists("v1-onnx") and registry.versions() == []
    began = ModelManifest.model_validate_json((first / "protege.json").read_text()).created_at
    second = staged_version(tmp_path / "second", "v1-onnx")
    (second / "tokenizer.json").write_text('{"vocab": 1}')
    write_manifest(
        second,
        ModelManifest(version="v1-onnx", role="student", created_at=began + 5, labels=["a"]),
    )
    registry.publish(second)  # the retry finishes it
    assert [m.version for m in registry.versions()] == ["v1-onnx"]
    folder = registry.path("v1-onnx")  # loads (an object store's download checks every hash)
    marker = json.loads((folder / COMPLETE_NAME).read_text())
    assert file_hashes(folder) == marker["files"]
    assert sorted(marker["files"]) == ["model.safetensors", "protege.json", "tokenizer.json"]
    assert (folder / "model.safetensors").read_bytes() == b"v1-onnx"
    # an object store keeps the manifest the first attempt wrote; a folder saw none of it
    assert registry.manifest("v1-onnx").created_at == (began + 5 if registry.local else began)
