"""The model registry: immutable versions and a compare-and-set ``current`` pointer.

    <root>/versions/<version>/   a model folder (safetensors, tokenizer, protege.json,
                                 _complete.json: every file's SHA-256, written last)
    <root>/current.json          {"version": ..., "history": [older currents, newest last]}
    <root>/runs/<run id>.json    distillation run reports (written by distill)

The root is a local folder or an object-store URI (``s3://bucket/prefix``; see
``serving.contracts.storage``). A version is never changed or reused once published. Locally it is
published by renaming a complete staging folder into ``versions/``; on an object store its
files are uploaded first and ``_complete.json`` last, and only a version with that marker
exists (a publish retried after one that died before the marker finishes it). A replica
downloads a remote version to a local cache and checks every file (weights, config,
tokenizer, manifest) against the marker's hashes before it loads any of it. The pointer
moves by compare-and-set, so a crash leaves the old or the new pointer and a move based on
a stale read fails instead of undoing another; each move carries an id, so a move whose
answer was lost is known by re-reading the pointer. Serving reads the registry; only the
distillation job and the CLI write it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.contracts.manifest import MANIFEST_NAME, ModelManifest, read_manifest
from serving.contracts.storage import Store, open_store

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A version id becomes a folder name: letters, digits, '.', '_', '-'; no path separator."""
COMPLETE_NAME = "_complete.json"
POINTER_KEY = "current.json"
REFUSED_RETRY_S = 60.0
"""A version whose download failed its hash check is not downloaded again for this long."""


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says why."""


class PointerMoved(RegistryError):
    """A compare-and-set on the current pointer found another version than expected."""


class CorruptVersion(RegistryError):
    """A downloaded version whose files do not match the hashes it was published with."""


ANY = "<any>"
"""``expected`` for an unconditional move (an operator's explicit command)."""


def check_version(version: str) -> str:
    """``version`` if it is a safe folder name, else a RegistryError saying what is wrong."""
    if (
        not isinstance(version, str)
        or not re.fullmatch(VERSION_PATTERN, version)
        or ".." in version
    ):
        raise RegistryError(
            f"version id {version!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(at most 128, no '..')"
        )
    return version


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file below ``folder`` (but the marker), by relative path."""
    hashes = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and path.name != COMPLETE_NAME:
            with open(path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256")
            hashes[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return hashes


def content_digest(hashes: dict[str, str]) -> str:
    """One hash over every file's path and hash."""
    joined = "\n".join(f"{name} {h}" for name, h in sorted(hashes.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


class Registry:
    def __init__(
        self,
        root: str | Path,
        cache_dir: str | Path | None = None,
        endpoint_url: str | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.store: Store = open_store(root, endpoint_url)
        self._on_refused = on_refused
        self.uri = self.store.uri
        self.local = self.store.local_path("")  # None for an object store
        self.cache_dir = Path(cache_dir or Path.home() / ".cache" / "protege" / "registry")
        self._refused: dict[str, float] = {}

    @property
    def root(self) -> Path:
        """The registry's folder (local registries only)."""
        if self.local is None:
            raise RegistryError(f"registry {self.uri} is an object store, not a folder")
        return self.local

    def __str__(self) -> str:
        return self.uri

    # --- reading --------------------------------------------------------------------------

    def versions(self) -> list[ModelManifest]:
        """Every published version, oldest first."""
        found = []
        for version in self._version_ids():
            data = self.store.read(f"versions/{version}/{MANIFEST_NAME}")
            if data is not None:
                found.append(ModelManifest.model_validate_json(data))
        return sorted(found, key=lambda m: m.created_at)

    def _version_ids(self) -> list[str]:
        if self.local is not None:
            folder = self.local / "versions"
            return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        keys = self.store.list("versions")
        return sorted(k.split("/")[1] for k in keys if k.endswith(f"/{COMPLETE_NAME}"))

    def exists(self, version: str) -> bool:
        key = f"versions/{check_version(version)}/"
        key += MANIFEST_NAME if self.local is not None else COMPLETE_NAME
        return self.store.read(key) is not None

    def _require(self, version: str) -> None:
        if not self.exists(version):
            known = ", ".join(m.version for m in self.versions()) or "none"
            raise RegistryError(f"version {version!r} is not in {self.uri} (known: {known})")

    def path(self, version: str) -> Path:
        """The version's local folder (downloaded and checked, for an object store)."""
        self._require(version)
        if self.local is not None:
            return self.local / "versions" / version
        return self._cached(version)

    def manifest(self, version: str) -> ModelManifest:
        data = self.store.read(f"versions/{check_version(version)}/{MANIFEST_NAME}")
        if data is None:
            raise RegistryError(f"version {version!r} is not in {self.uri}")
        return ModelManifest.model_validate_json(data)

    def current(self) -> str | None:
        state = self._read_pointer()
        return state["version"] if state else None

    def history(self) -> list[str]:
        state = self._read_pointer()
        return list(state["history"]) if state else []

    def _cached(self, version: str) -> Path:
        """Download a remote version into the cache once, checking every file's hash. Two
        replicas on one node share the cache: a file lock per version makes one download
        it while the other waits, and a checked folder is never removed."""
        folder = self.cache_dir / version
        if (folder / COMPLETE_NAME).exists():
            return folder
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f".{version}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # per open file: excludes other threads too
            try:
                if not (folder / COMPLETE_NAME).exists():
                    self._download(version, folder)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return folder

    def _download(self, version: str, folder: Path) -> None:
        refused_at = self._refused.get(version)
        if refused_at is not None and time.monotonic() - refused_at < REFUSED_RETRY_S:
            raise CorruptVersion(f"version {version} failed its hash check; not loaded")
        marker = json.loads(self.store.read(f"versions/{version}/{COMPLETE_NAME}") or b"{}")
        names = list(marker.get("files", {}))
        if any(".." in n.split("/") or n.startswith("/") for n in names):
            raise CorruptVersion(f"version {version}'s marker names a path outside it")
        staging = self.cache_dir / f".{version}.{os.getpid()}.download"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            for name in names:
                self.store.download(f"versions/{version}/{name}", staging / name)
            actual = file_hashes(staging)
            if actual != marker["files"]:
                self._refused[version] = time.monotonic()
                if self._on_refused is not None:
                    self._on_refused(version)
                wrong = sorted(n for n in names if actual.get(n) != marker["files"][n])
                raise CorruptVersion(
                    f"version {version} refused: {', '.join(wrong)} do not match the "
                    "hashes it was published with"
                )
            (staging / COMPLETE_NAME).write_text(json.dumps(marker))
            shutil.rmtree(folder, ignore_errors=True)  # an unchecked leftover, never a checked one
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # --- writing --------------------------------------------------------------------------

    def publish(self, staged: Path) -> str:
        """A complete model folder (with its protege.json) in as a new version. Locally the
        folder is moved in; to an object store its files are uploaded, the marker last."""
        manifest = read_manifest(staged)
        if manifest is None:
            raise RegistryError(f"{staged} has no protege.json manifest: not a publishable version")
        version = check_version(manifest.version)
        if self.exists(version):
            raise RegistryError(f"version {version} already exists; versions are immutable")
        if self.local is None:
            self._resume(staged, manifest)
        hashes = file_hashes(staged)
        marker = json.dumps({"version": version, "files": hashes, "digest": content_digest(hashes)})
        if self.local is not None:
            (Path(staged) / COMPLETE_NAME).write_text(marker)
            (self.local / "versions").mkdir(parents=True, exist_ok=True)
            os.replace(staged, self.local / "versions" / version)  # same file system: atomic
            return version
        for name in hashes:  # each file created only if absent: never rewritten
            self._create(f"versions/{version}/{name}", (Path(staged) / name).read_bytes())
        self._create(f"versions/{version}/{COMPLETE_NAME}", marker.encode())  # last
        shutil.rmtree(staged, ignore_errors=True)
        return version

    def _resume(self, staged: Path, manifest: ModelManifest) -> None:
        """A version without its marker is unfinished: a publish died after some of its
        files (the manifest among them). A retry with the same content finishes it, even
        where its manifest was made afresh (``created_at`` is when it was staged): the
        stored manifest is kept when it differs from the staged one in nothing else.
        Other content still clashes (``_create`` refuses it)."""
        stored = self.store.read(f"versions/{manifest.version}/{MANIFEST_NAME}")
        if stored is None:
            return
        first = ModelManifest.model_validate_json(stored)
        if first.model_copy(update={"created_at": manifest.created_at}) == manifest:
            (Path(staged) / MANIFEST_NAME).write_bytes(stored)

    def _create(self, key: str, data: bytes) -> None:
        """Create ``key`` once; finding exactly ``data`` there is our own earlier attempt
        (a retried request), anything else a clash with another publisher."""
        if not self.store.create(key, data) and not self.store.matches(key, data):
            raise RegistryError(
                f"{self.uri}/{key} exists with other content: another process is publishing "
                "this version; versions are immutable"
            )

    def promote(self, version: str, expected: str | None = ANY) -> None:
        """Point ``current`` at ``version`` (which must be published). With ``expected``
        (a version, or None for an empty registry), only if the pointer still names it:
        a run started on A never undoes a rollback that happened while it ran."""
        self._require(version)  # published; each replica checks its download's hashes

        def change(state: dict[str, Any] | None) -> dict[str, Any]:
            self._checked(state, expected, f"promote {version}")
            history = list(state["history"]) if state else []
            if state and state["version"] != version:
                history.append(state["version"])
            return {"version": version, "history": history, "updated_at": time.time()}

        self._move(change)

    def rollback(self, expected: str | None = ANY) -> str:
        """Point ``current`` back at the version before it; returns that version."""

        def change(state: dict[str, Any] | None) -> dict[str, Any]:
            self._checked(state, expected, "roll back")
            if not state or not state["history"]:
                raise RegistryError(
                    "nothing to roll back to: the current version has no predecessor"
                )
            history = list(state["history"])
            previous = history.pop()
            self._require(previous)
            return {"version": previous, "history": history, "updated_at": time.time()}

        return str(self._move(change)["version"])

    @staticmethod
    def _checked(state: dict[str, Any] | None, expected: str | None, action: str) -> None:
        actual = state["version"] if state else None
        if expected != ANY and actual != expected:
            raise PointerMoved(
                f"not done ({action}): current is {actual}, not {expected} as expected; "
                "it moved meanwhile (a rollback or another promotion)"
            )

    def _move(self, change: Any) -> dict[str, Any]:
        """Compare-and-set the pointer: ``change`` sees the state it replaces. Each move
        carries its own id, so a retried write that had landed (its answer lost) is
        recognised instead of being applied twice."""
        move_id = uuid.uuid4().hex

        def apply(old: bytes | None) -> bytes | None:
            state = json.loads(old) if old else None
            if state and state.get("move") == move_id:
                return None  # our own write landed: done
            return json.dumps({**change(state), "move": move_id}, indent=1).encode()

        try:
            result = self.store.update(POINTER_KEY, apply)
        except OSError:
            landed = self._landed(move_id)
            if landed is not None:
                return landed
            raise
        assert result is not None
        return dict(json.loads(result))

    def _landed(self, move_id: str, attempts: int = 3) -> dict[str, Any] | None:
        """The pointer, if the move ``move_id`` is what it holds: a conditional write can
        land with its answer lost (a timeout, a dropped connection). None if another state
        is there; a store that still fails after ``attempts`` reads raises."""
        for attempt in range(attempts):
            try:
                state = self._read_pointer()
                break
            except OSError:
                if attempt == attempts - 1:
                    raise
                time.sleep(2**attempt)
        return state if state and state.get("move") == move_id else None

    def import_folder(self, folder: Path) -> str:
        """Copy an existing model folder in (e.g. the seed student); returns its version."""
        manifest = read_manifest(folder)
        if manifest is None:
            raise RegistryError(f"{folder} has no protege.json manifest")
        if self.exists(manifest.version):
            return manifest.version
        staging = self.staging_dir() / f"{manifest.version}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging, ignore=shutil.ignore_patterns(COMPLETE_NAME))
        return self.publish(staging)

    def staging_dir(self) -> Path:
        """Where a version is assembled before publishing: inside a local registry (so the
        move in is a rename), in the cache for an object store."""
        return (self.local or self.cache_dir) / "staging"

    def write_run(self, run_id: str, report: dict[str, Any]) -> str:
        key = f"runs/{run_id}.json"
        self.store.write(key, json.dumps(report, indent=1).encode())
        return f"{self.uri}/{key}"

    def runs(self) -> list[dict[str, Any]]:
        """Every run report, in run id order (ids start with the run's start time)."""
        reports = []
        for key in self.store.list("runs"):
            if key.endswith(".json"):
                try:
                    reports.append(dict(json.loads(self.store.read(key) or b"")))
                except ValueError:
                    reports.append({"result": "unreadable", "key": key})
        return reports

    def _read_pointer(self) -> dict[str, Any] | None:
        data = self.store.read(POINTER_KEY)
        return dict(json.loads(data)) if data else None
