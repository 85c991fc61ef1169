"""Readiness probes the teacher on a timer: however many callers ask /readyz, a failing
teacher gets at most one call per probe interval, and no answer carries an exception's text.
A fake clock moves time; the cascade (``CascadeService``) is the real one."""

import asyncio
import contextvars
import logging

import pytest

from serving.classify.service import CascadeService
from serving.config import GatewayConfig
from serving.teacher_probe import UNAVAILABLE, TeacherProbe

SECRET = "/srv/secret-models/teacher at 10.0.0.7"  # what an exception may carry
INFO = {"version": "teacher-1", "labels": ["a", "b"]}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Teacher:
    """Fails (with a revealing message) or answers; counts the calls it was sent."""

    def __init__(self) -> None:
        self.failing, self.calls = True, 0

    async def __call__(self, texts: list[str], timeout: float):
        self.calls += 1
        if self.failing:
            raise RuntimeError(f"teacher replica died: {SECRET}")
        return [{"probs": [0.5, 0.5], "truncated": False, "version": "teacher-1"}] * len(texts)


class Details:
    """The teacher's info call: down (revealing message) or up; counts its calls."""

    def __init__(self, up: bool = True) -> None:
        self.up, self.calls = up, 0

    async def __call__(self) -> dict:
        self.calls += 1
        if not self.up:
            raise ConnectionError(f"cannot reach {SECRET}")
        return INFO


class Sink:
    async def write(self, records) -> bool:
        return True


class Metrics:
    def inc(self, name, value=1.0, **tags) -> None:
        pass

    def observe(self, name, value, **tags) -> None:
        pass

    def request(self, *args) -> None:
        pass


async def student(texts):
    raise AssertionError("readiness never asks the student")


def cascade(teacher: Teacher) -> CascadeService:
    config = GatewayConfig.model_validate({"student": {"path": "s"}, "teacher": {"path": "t"}})
    return CascadeService(config, ["a", "b"], student, teacher, Sink(), Metrics())


async def drain() -> None:
    """Let the background probe run (the fakes never wait on anything)."""
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture(autouse=True)
def logged(monkeypatch):
    monkeypatch.setattr(logging.getLogger("ray.serve"), "propagate", True)  # Serve may unset it


def test_many_callers_of_a_failing_teacher_cost_one_call_per_interval():
    async def scenario():
        teacher, clock = Teacher(), Clock()
        service = cascade(teacher)
        await service.ask_teacher(["traffic"])  # traffic failed: the teacher is failing
        probe = TeacherProbe(service, Details(), unready_after_s=0, every_s=5, clock=clock)
        teacher.calls = 0
        intervals = 4
        for interval in range(intervals):
            for step in range(10):  # callers spread over the interval
                clock.now = 100.0 + interval * 5 + step * 0.49
                answers = await asyncio.gather(*(probe.readiness("s1") for _ in range(20)))
                assert {a.status for a in answers} == {"not ready"}
                await drain()
            assert teacher.calls == interval + 1  # 200 callers this interval, one call
        answer = (await probe.readiness("s1")).model_dump_json()
        assert "teacher failing for" in answer and SECRET not in answer and "died" not in answer

    asyncio.run(scenario())


def test_readiness_comes_back_once_a_probe_gets_an_answer():
    async def scenario():
        teacher, clock = Teacher(), Clock()
        service = cascade(teacher)
        await service.ask_teacher(["traffic"])
        probe = TeacherProbe(service, Details(), unready_after_s=0, every_s=5, clock=clock)
        assert (await probe.readiness("s1")).status == "not ready"
        teacher.failing = False
        clock.now += 5
        await probe.readiness("s1")  # starts the probe; reads the last result
        await drain()
        ready = await probe.readiness("s1")
        assert ready.status == "ready" and (ready.student, ready.teacher) == ("s1", "teacher-1")

    asyncio.run(scenario())


def test_a_working_teacher_is_never_called_by_readiness():
    async def scenario():
        teacher, clock, details = Teacher(), Clock(), Details()
        probe = TeacherProbe(cascade(teacher), details, unready_after_s=30, clock=clock)
        for second in range(20):
            clock.now = 100.0 + second
            assert (await probe.readiness("s1")).status == "ready"
            await drain()
        assert teacher.calls == 0 and details.calls == 10  # the info, once per 2 s interval

    asyncio.run(scenario())


def test_an_unreachable_teacher_is_a_fixed_reason_its_error_only_logged(caplog):
    async def scenario():
        clock, details = Clock(), Details(up=False)
        probe = TeacherProbe(cascade(Teacher()), details, unready_after_s=30, clock=clock)
        answers = await asyncio.gather(*(probe.readiness("s1") for _ in range(50)))
        assert details.calls == 1  # the first callers share the first probe
        for answer in answers:
            assert answer.model_dump() == {
                "status": "not ready",
                "reason": UNAVAILABLE,
                "student": None,
                "teacher": None,
            }
        details.up = True
        clock.now += 2
        await probe.readiness("s1")
        await drain()
        assert (await probe.readiness("s1")).status == "ready" and details.calls == 2

    asyncio.run(scenario())
    assert SECRET in caplog.text  # for the operator, in the replica's log


CALLER = contextvars.ContextVar("caller", default=None)  # stands for Serve's request context


class SeenBy:
    """Notes the caller each call runs in (the probe's info call, then its teacher call)."""

    def __init__(self, call) -> None:
        self.call, self.seen = call, []

    async def __call__(self, *args, **kwargs):
        self.seen.append(CALLER.get())
        return await self.call(*args, **kwargs)


def test_the_probe_runs_in_a_fresh_context_not_its_callers():
    """Ray Serve cancels the calls a cancelled request made from its context: the probe,
    shared by every caller, must not be one of them."""

    async def scenario():
        teacher, details = SeenBy(Teacher()), SeenBy(Details())
        service = cascade(teacher)
        await service.ask_teacher(["traffic"])  # failing: the probe also asks the teacher
        teacher.seen.clear()
        probe = TeacherProbe(service, details, unready_after_s=30, clock=Clock())
        CALLER.set("request-1")
        await probe.readiness("s1")
        await drain()
        assert CALLER.get() == "request-1"  # the caller's own context is untouched
        assert details.seen == [None] and teacher.seen == [None]

    asyncio.run(scenario())
