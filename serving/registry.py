"""The model registry: immutable version folders and an atomically moved ``current`` pointer.

    <root>/versions/<version>/   a model folder (safetensors, tokenizer, protege.json)
    <root>/current.json          {"version": ..., "history": [older currents, newest last]}
    <root>/runs/<run id>.json    distillation run reports (written by distill)

A version is published by renaming a complete staging folder into ``versions/`` and is
never changed or reused afterwards. The pointer is written to a temporary file and
renamed over ``current.json``, so a crash at any moment leaves either the old or the new
pointer, never half of one. Serving reads the registry; only the distillation job and
the CLI write it.

Storage is the local file system; every access goes through the few methods of this
class (read, list, publish, move the pointer), the seam an object store would implement.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from serving.manifest import ModelManifest, read_manifest

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A version id becomes a folder name: letters, digits, '.', '_', '-'; no path separator."""


class RegistryError(ValueError):
    """A registry operation that cannot be done; the message says why."""


class PointerMoved(RegistryError):
    """A compare-and-set on the current pointer found another version than expected."""


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


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.runs_dir = self.root / "runs"
        self._pointer = self.root / "current.json"

    # --- reading --------------------------------------------------------------------------

    def versions(self) -> list[ModelManifest]:
        """Every published version, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = [read_manifest(p) for p in self.versions_dir.iterdir() if p.is_dir()]
        return sorted((m for m in found if m is not None), key=lambda m: m.created_at)

    def path(self, version: str) -> Path:
        folder = self.versions_dir / check_version(version)
        if not (folder / "protege.json").exists():
            known = ", ".join(m.version for m in self.versions()) or "none"
            raise RegistryError(f"version {version!r} is not in {self.root} (known: {known})")
        return folder

    def manifest(self, version: str) -> ModelManifest:
        manifest = read_manifest(self.path(version))
        assert manifest is not None
        return manifest

    def current(self) -> str | None:
        state = self._read_pointer()
        return state["version"] if state else None

    def history(self) -> list[str]:
        state = self._read_pointer()
        return list(state["history"]) if state else []

    # --- writing --------------------------------------------------------------------------

    def publish(self, staged: Path) -> str:
        """Move a complete model folder (with its protege.json) in as a new version."""
        manifest = read_manifest(staged)
        if manifest is None:
            raise RegistryError(f"{staged} has no protege.json manifest: not a publishable version")
        target = self.versions_dir / check_version(manifest.version)
        if target.exists():
            raise RegistryError(
                f"version {manifest.version} already exists; versions are immutable"
            )
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)  # same file system: atomic
        return manifest.version

    def promote(self, version: str, expected: str | None = ANY) -> None:
        """Point ``current`` at ``version`` (which must be published). With ``expected``
        (a version, or None for an empty registry), only if the pointer still names it:
        a run started on A never undoes a rollback that happened while it ran."""
        self.path(version)
        with self._pointer_lock():
            state = self._checked(expected, f"promote {version}")
            history = list(state["history"]) if state else []
            if state and state["version"] != version:
                history.append(state["version"])
            self._write_pointer({"version": version, "history": history, "updated_at": time.time()})

    def rollback(self, expected: str | None = ANY) -> str:
        """Point ``current`` back at the version before it; returns that version."""
        with self._pointer_lock():
            state = self._checked(expected, "roll back")
            if not state or not state["history"]:
                raise RegistryError(
                    "nothing to roll back to: the current version has no predecessor"
                )
            history = list(state["history"])
            previous = history.pop()
            self.path(previous)
            self._write_pointer(
                {"version": previous, "history": history, "updated_at": time.time()}
            )
            return previous

    def _checked(self, expected: str | None, action: str) -> dict[str, Any] | None:
        state = self._read_pointer()
        actual = state["version"] if state else None
        if expected != ANY and actual != expected:
            raise PointerMoved(
                f"not done ({action}): current is {actual}, not {expected} as expected; "
                "it moved meanwhile (a rollback or another promotion)"
            )
        return state

    @contextlib.contextmanager
    def _pointer_lock(self) -> Iterator[None]:
        """Pointer moves on this registry happen one at a time (an advisory file lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".pointer.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def import_folder(self, folder: Path) -> str:
        """Copy an existing model folder in (e.g. the seed student); returns its version."""
        manifest = read_manifest(folder)
        if manifest is None:
            raise RegistryError(f"{folder} has no protege.json manifest")
        if (self.versions_dir / check_version(manifest.version)).exists():
            return manifest.version
        staging = self.root / "staging" / f"{manifest.version}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(folder, staging)
        return self.publish(staging)

    def write_run(self, run_id: str, report: dict[str, Any]) -> Path:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        path = self.runs_dir / f"{run_id}.json"
        _atomic_write(path, json.dumps(report, indent=1))
        return path

    def _read_pointer(self) -> dict[str, Any] | None:
        if not self._pointer.exists():
            return None
        return dict(json.loads(self._pointer.read_text()))

    def _write_pointer(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self._pointer, json.dumps(state, indent=1))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
