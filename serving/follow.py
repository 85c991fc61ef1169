"""Each gateway replica follows the registry's current pointer: one source of truth for
what serves, with no helper process.

Every ``registry_poll_s`` a replica reads the pointer and asks its student slot for that
version (the slot loads it in the background and swaps it in; see ``serving.hot_swap``).
A ``student_version`` in the deployment's ``user_config`` pins the replica to that version
instead (a held rollback); a ``user_config`` without one goes back to following the
pointer. A version that fails to load is asked for again only after ``retry_failed_s`` or
when the target changes, so a broken version never makes a replica reload in a loop, and a
failure never ends the following.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from serving.hot_swap import StudentSlot

logger = logging.getLogger("ray.serve")
RETRY_FAILED_S = 60.0


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
