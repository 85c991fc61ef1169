"""A request cancelled while its escalated inputs wait on the teacher (a client that went
away, ``request_timeout_s``) loses no record and writes none twice: its escalations are
logged ``cancelled`` at inclusion probability 1 and its drawn audits with them, all under
the request's server-made key. The awkward orderings: cancelled while the teacher works,
while the log write is in progress, and a teacher answer arriving after the cancellation."""

import asyncio
import contextvars

import pytest
from test_service import TEACHER, Sink, Teacher, service

from serving.classify.service import Routing

REQUEST = contextvars.ContextVar("request", default=None)  # as Ray Serve's request context


async def until(condition, turns: int = 10_000) -> None:
    """Let the loop run until ``condition()`` holds (no wall-clock sleep)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def settle() -> None:
    """Give every ready task on the loop many turns to run."""
    for _ in range(100):
        await asyncio.sleep(0)


async def cancelled(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


class RemoteTeacher(Teacher):
    """Like a teacher replica: its work goes on when the caller gives up, and answers later
    (into nothing). Texts starting with "sure" are answered at once (online audits)."""

    def __init__(self) -> None:
        super().__init__()
        self.remote: list[asyncio.Task] = []
        self.contexts: list[tuple[list[str], object]] = []

    async def __call__(self, texts, timeout):
        self.calls.append(list(texts))
        self.contexts.append((list(texts), REQUEST.get()))
        if all(t.startswith("sure") for t in texts):
            return [TEACHER] * len(texts)

        async def work():
            await self.release.wait()
            return [TEACHER] * len(texts)

        self.remote.append(asyncio.ensure_future(work()))
        return await asyncio.shield(self.remote[-1])


class SlowSink(Sink):
    """Holds each write until released, then appends it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes, self.release = 0, asyncio.Event()

    async def write(self, records):
        self.writes += 1
        await self.release.wait()
        return await super().write(records)


def test_cancelled_mid_escalation_logs_every_chosen_input_once_with_its_audits():
    async def scenario():
        svc, teacher, sink = service(
            RemoteTeacher(), draw=lambda: 0.0, cascade={"threshold": 0.7, "audit_fraction": 0.5}
        )
        texts = ["unsure a", "sure b", "nan c", "sure d"]
        task = asyncio.create_task(svc.classify(texts, "client-id", Routing()))
        await until(lambda: svc.teacher_in_flight == 2)
        await cancelled(task)  # the client went away while the teacher works
        await until(lambda: len(sink.records) == 4)
        by_text = {r.text: r for r in sink.records}
        assert {
            t: (r.reason, r.teacher_status, r.inclusion_probability) for t, r in by_text.items()
        } == {
            "unsure a": ("low_confidence", "cancelled", 1.0),
            "nan c": ("low_confidence", "cancelled", 1.0),
            "sure b": ("audit", "skipped", 0.5),  # drawn at decision time, labelled offline
            "sure d": ("audit", "skipped", 0.5),
        }
        assert all(r.teacher_probs is None for r in sink.records)
        (key,) = {r.request_key for r in sink.records}
        assert key and key != "client-id" and {r.request_id for r in sink.records} == {"client-id"}
        assert svc.teacher_in_flight == 0

        teacher.release.set()  # the teacher's answer arrives after the cancellation
        await asyncio.gather(*teacher.remote)
        await settle()
        assert len(sink.records) == 4  # and makes no second record
        # audits are counted once, when drawn; a cancelled request is not counted as served
        assert svc.metrics.counts[("protege_escalations", "audit")] == 2
        assert svc.metrics.counts[("escalations", "low_confidence")] == 0

    asyncio.run(scenario())


def test_cancelled_during_the_log_write_writes_once_and_loses_nothing():
    async def scenario():
        sink = SlowSink()
        svc, _, _ = service(
            sink=sink, draw=lambda: 0.0, cascade={"threshold": 0.7, "audit_fraction": 0.5}
        )
        task = asyncio.create_task(svc.classify(["unsure a", "sure b"], "r", Routing()))
        await until(lambda: sink.writes == 1)  # the teacher answered; the write is under way
        await cancelled(task)
        sink.release.set()
        await until(lambda: len(sink.records) == 2)
        await settle()
        assert sink.writes == 1 and len(sink.records) == 2
        assert sorted((r.text, r.teacher_status) for r in sink.records) == [
            ("sure b", "skipped"),
            ("unsure a", "answered"),
        ]
        assert len({r.request_key for r in sink.records}) == 1
        assert not svc._background  # the write finished and let go

    asyncio.run(scenario())


def test_an_online_audit_of_a_cancelled_request_is_still_asked_outside_its_context():
    """Ray Serve cancels the calls a cancelled request made from its context; an online
    audit asked for that request runs in a context of its own, so it is not one of them."""

    async def scenario():
        cascade = {"threshold": 0.7, "audit_fraction": 0.5, "audit_teacher": "online"}
        svc, teacher, sink = service(RemoteTeacher(), draw=lambda: 0.0, cascade=cascade)

        async def request():
            REQUEST.set("the request's context")
            return await svc.classify(["unsure a", "sure b"], "r", Routing())

        task = asyncio.create_task(request())
        await until(lambda: svc.teacher_in_flight == 1)
        await cancelled(task)
        await until(lambda: len(sink.records) == 2)
        await settle()
        assert sorted((r.text, r.reason, r.teacher_status) for r in sink.records) == [
            ("sure b", "audit", "answered"),  # asked off the response path, once
            ("unsure a", "low_confidence", "cancelled"),
        ]
        assert len({r.request_key for r in sink.records}) == 1
        assert teacher.contexts == [(["unsure a"], "the request's context"), (["sure b"], None)]
        assert svc.audits_in_flight == 0
        teacher.release.set()
        await asyncio.gather(*teacher.remote)

    asyncio.run(scenario())


def test_every_record_of_a_request_shares_one_key_and_no_two_requests_do():
    async def scenario():
        svc, _, sink = service(draw=lambda: 0.0, cascade={"threshold": 0.7, "audit_fraction": 0.5})
        for _ in range(2):  # a client that reuses its request id
            await svc.classify(["unsure a", "sure b", "nan c"], "same-client-id", Routing())
        first, second = sink.records[:3], sink.records[3:]
        assert len({r.request_key for r in first}) == len({r.request_key for r in second}) == 1
        assert first[0].request_key != second[0].request_key
        assert len(first[0].request_key) == 32 and int(first[0].request_key, 16) >= 0

    asyncio.run(scenario())


def test_a_sink_that_raises_answers_not_logged_and_never_fails_the_request():
    class Broken(Sink):
        async def write(self, records):
            raise OSError("disk gone")

    svc, _, _ = service(sink=Broken())
    answer = asyncio.run(svc.classify(["unsure a"], "r", Routing()))
    assert answer.logged is False and answer.outputs[0].tier == "teacher"


def test_a_cancelled_request_beyond_the_bulkhead_logs_its_shed_inputs_as_skipped():
    async def scenario():
        svc, _, sink = service(RemoteTeacher(), overload={"teacher_max_in_flight": 1})
        task = asyncio.create_task(svc.classify(["unsure a", "unsure b"], "r", Routing()))
        await until(lambda: svc.teacher_in_flight == 1)
        await cancelled(task)
        await until(lambda: len(sink.records) == 2)
        assert [(r.text, r.teacher_status) for r in sink.records] == [
            ("unsure a", "cancelled"),  # waited on the teacher
            ("unsure b", "skipped"),  # never asked: the bulkhead was full
        ]
        assert svc.metrics.counts[("protege_teacher_shed",)] == 1

    asyncio.run(scenario())
