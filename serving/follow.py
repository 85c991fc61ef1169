"""Each gateway replica follows the registry's current pointer: one source of truth for
what serves, with no helper process.

Every ``registry_poll_s`` a replica reads the pointer and asks its student slot for that
version (the slot loads it in the background and swaps it in; see ``serving.hot_swap``).
A ``student_version`` in the deployment's ``user_config`` pins the replica to that version
instead (a held rollback); a ``user_config`` without one goes back to following the
pointer. A version that fails to load is asked for again only after ``retry_failed_s`` or
when the target changes, so a broken version never makes a replica reload in a loop, and a
failure never ends the following.

Every kind's cascade follows its own registry the same way: :class:`Following` holds one
cascade's registry, slot and follower, and what the replica does with them (its first
version, a ``user_config`` pin, a poll, its swap state for ``/v1/models``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from serving.contracts.registry import Registry
from serving.contracts.storage import StoreURI
from serving.hot_swap import ActiveStudent, StudentSlot, without_paths
from serving.schemas import SwapStatus

logger = logging.getLogger("ray.serve")
RETRY_FAILED_S = 60.0
FIRST_LOAD_WAIT_S = 300.0  # Serve holds a new replica's first requests while reconfigure runs


class PointerFollower:
    def __init__(
        self,
        read_pointer: Callable[[], str | None],
        folder_of: Callable[[str], Path],
        slot: StudentSlot,
        retry_failed_s: float = RETRY_FAILED_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read_pointer, self._folder_of, self.slot = read_pointer, folder_of, slot
        self._retry_failed_s, self._clock = retry_failed_s, clock
        self._lock = threading.Lock()  # a poll and a reconfigure never interleave
        self.pin: str | None = None
        self.threshold: float | None = None
        self.pointer: str | None = None  # the last pointer value read
        self._asked: tuple[str, float | None] = (slot.active.version, None)
        self._failed_at: float | None = None  # when the last request was first seen failed

    @property
    def following(self) -> str:
        return f"pinned to {self.pin}" if self.pin else "the registry's current pointer"

    def configure(self, pin: str | None, threshold: float | None) -> None:
        """Serve's ``user_config``: pin a version (or None to follow), and a threshold."""
        if pin is not None:
            self._folder_of(pin)  # an unknown version is refused before anything changes
        with self._lock:
            self.pin, self.threshold = pin, threshold
            self._apply(force=True)

    def poll(self) -> None:
        with self._lock:
            self._apply(force=False)

    def _apply(self, force: bool) -> None:
        try:
            self.pointer = self._read_pointer()
        except Exception:
            if self.pin is None:
                raise  # tried again next poll
            # pinned: the pointer does not matter now
        target = self.pin or self.pointer or self.slot.active.version
        wanted = (target, self.threshold)
        if wanted == self._asked and not force and not self._retry_due(target):
            return
        active = self.slot.active
        # a RegistryError here: tried again next poll
        folder = active.model.folder if target == active.version else self._folder_of(target)
        self._asked, self._failed_at = wanted, None
        if self.slot.request(target, folder, self.threshold):
            logger.info("following %s: asked for %s", self.following, target)

    def _retry_due(self, target: str) -> bool:
        """The last request for ``target`` failed (nothing serves or loads it), and the
        failure was seen ``retry_failed_s`` ago."""
        failed = self.slot.active.version != target and self.slot.stats.loading != target
        if not failed:
            self._failed_at = None
            return False
        if self._failed_at is None:
            self._failed_at = self._clock()
        return self._clock() - self._failed_at >= self._retry_failed_s


def open_registry(
    uri: StoreURI | None,
    cache_dir: Path,
    endpoint_url: str | None,
    on_refused: Callable[[str], None],
) -> Registry | None:
    """The registry at ``uri`` (None without one), checked reachable: else the replica stops
    with an error naming it."""
    if not uri:
        return None
    registry = Registry(uri, cache_dir=cache_dir, endpoint_url=endpoint_url, on_refused=on_refused)
    registry.store.check()
    return registry


def first_student(
    registry: Registry | None, fallback: Path, load: Callable[[Path], ActiveStudent]
) -> ActiveStudent:
    """The registry's current version; ``fallback`` (the config's student path) when there
    is none, or when it cannot be loaded (a replica must come up: the follower keeps
    trying the pointer)."""
    current = registry.current() if registry else None
    if registry is not None and current:
        try:
            return load(registry.path(current))
        except Exception as exc:
            logger.error(
                "current version %s cannot be loaded, serving the configured student: %s",
                current,
                without_paths(str(exc)),
            )
    return load(fallback)


class Following:
    """One cascade's student slot and, with a registry, its pointer follower."""

    def __init__(self, slot: StudentSlot, registry: Registry | None) -> None:
        self.slot = slot
        self.follower = PointerFollower(registry.current, registry.path, slot) if registry else None
        self._configured = False

    def configure(self, pin: str | None, threshold: float | None) -> None:
        """Serve's ``user_config`` for this cascade: ``pin`` a version (loaded in the
        background; a new replica waits for it), none follows the registry's pointer
        again; ``threshold`` overrides the version's calibrated one (in place when the
        version stays). Raises with the reason when it cannot apply."""
        if self.follower is not None:
            self.follower.configure(pin, threshold)
            if not self._configured:  # a new replica serves the pinned version at once
                self.slot.wait(FIRST_LOAD_WAIT_S)
        elif pin is not None:
            raise ValueError("student_version in user_config needs a registry in the config")
        else:
            active = self.slot.active
            self.slot.request(active.version, active.model.folder, threshold)
        self._configured = True

    def refused(self, reason: str) -> None:
        """Count a ``user_config`` that could not apply; the old version keeps serving."""
        self.slot.stats.failures += 1
        self.slot.stats.last_error = without_paths(f"user_config refused: {reason}")

    def poll(self) -> None:
        if self.follower is not None:
            self.follower.poll()

    def status(self, configured_path: str = "its student.path") -> SwapStatus:
        stats = self.slot.stats
        return SwapStatus(
            loading=stats.loading,
            swaps=stats.swaps,
            failures=stats.failures,
            superseded=stats.superseded,
            last_error=stats.last_error,
            last_swap_seconds=stats.last_swap_seconds,
            following=self.follower.following if self.follower else configured_path,
            pointer=self.follower.pointer if self.follower else None,
        )
