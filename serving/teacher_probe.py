"""What ``/readyz`` says of the teacher, from at most one teacher call per probe interval.

Readiness is asked by every kubelet, load balancer and dashboard, and often. Asking the
teacher on each call would add one call per caller to a teacher that is already failing.
So the teacher is probed on a timer: the first caller after ``every_s`` starts one probe in
the background, and every caller reads the last finished probe's result (only the very first
caller waits, for there is no result yet). An answer from traffic clears a failing teacher
at once; the probe is what brings readiness back when no traffic reaches the teacher.

Reasons are fixed texts: an exception's text (a path, a host, a stack) is logged, never
returned to a caller.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from serving.http_api import Readiness

logger = logging.getLogger("ray.serve")
PROBE_EVERY_S = 2.0
UNAVAILABLE = "teacher unavailable (not reachable, or its labels differ; see the replica log)"
PROBE_TEXT = "readiness probe"


class TeacherState(Protocol):
    """What the probe needs from the cascade (``serving.classify.service.CascadeService``)."""

    teacher_failing_since: float | None

    def teacher_failing_for(self) -> float | None: ...

    async def ask_teacher(self, texts: list[str]) -> tuple[Any, str]: ...


class TeacherProbe:
    """The teacher's readiness, probed at most once per ``every_s`` whatever the callers."""

    def __init__(
        self,
        service: TeacherState,
        details: Callable[[], Awaitable[dict[str, Any]]],
        unready_after_s: float,
        every_s: float = PROBE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self._details = details  # the teacher's info (cached by the caller once known)
        self._unready_after_s = unready_after_s
        self._every_s = every_s
        self._clock = clock
        self._task: asyncio.Task[dict[str, Any] | None] | None = None
        self._started = 0.0
        self._last: dict[str, Any] | None = None  # the last finished probe's teacher info
        self._finished = False

    async def readiness(self, student_version: str) -> Readiness:
        """Ready when the teacher answered its info and has not failed every call for
        ``unready_after_s`` or longer."""
        info = await self._probed()
        if info is None:
            return Readiness(status="not ready", reason=UNAVAILABLE)
        failing = self._service.teacher_failing_for()
        if failing is not None and failing >= self._unready_after_s:
            reason = f"teacher failing for {failing:.0f} s (answers are degraded)"
            return Readiness(status="not ready", reason=reason)
        return Readiness(status="ready", student=student_version, teacher=info["version"])

    async def _probed(self) -> dict[str, Any] | None:
        running = self._task is not None and not self._task.done()
        if not running and (self._task is None or self._clock() - self._started >= self._every_s):
            self._started = self._clock()
            # an empty context, as the cascade's background tasks: Ray Serve cancels the
            # calls a cancelled request made from its context, and the probe is shared by
            # every caller, not one caller's child call (held in ``_task`` until done)
            self._task = contextvars.Context().run(asyncio.create_task, self._probe())
        if not self._finished:  # no result yet: wait for the first probe (shared, shielded)
            assert self._task is not None
            return await asyncio.shield(self._task)
        return self._last

    async def _probe(self) -> dict[str, Any] | None:
        try:
            info = await self._details()
            if self._service.teacher_failing_since is not None:
                # an answer clears the failing state; a failure is counted by the cascade
                await self._service.ask_teacher([PROBE_TEXT])
        except Exception:
            logger.warning("readiness probe: the teacher is unavailable", exc_info=True)
            info = None
        self._last, self._finished = info, True
        return info
