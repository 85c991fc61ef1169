"""The cascade's orchestration without Ray or HTTP: the decision, the teacher behind its
bulkhead and deadline, what is logged, bounded audits."""

import asyncio
import math
import time
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from serving.classify.service import CascadeService, Routing
from serving.config import GatewayConfig
from serving.contracts.threshold import ThresholdRule
from serving.hot_swap import ActiveStudent

ACTIVE = ActiveStudent(SimpleNamespace(version="student-1"), ThresholdRule(0.7, "fixed 0.7"))  # type: ignore[arg-type]
PROBS = {"sure": [0.95, 0.05], "unsure": [0.55, 0.45], "nan": [math.nan, math.nan]}
TEACHER = {"probs": [0.1, 0.9], "truncated": False, "version": "teacher-1"}


async def student(texts: list[str]):
    return [(np.array(PROBS[text.split()[0]]), False, ACTIVE) for text in texts]


class Teacher:
    """Answers, fails, or waits until released."""

    def __init__(self, mode: str = "answer") -> None:
        self.mode, self.calls, self.release = mode, [], asyncio.Event()

    async def __call__(self, texts: list[str], timeout: float):
        self.calls.append(list(texts))
        if self.mode == "fail":
            raise RuntimeError("teacher replica died")
        if self.mode == "hang":
            await asyncio.wait_for(self.release.wait(), timeout)
        return [TEACHER] * len(texts)


class Sink:
    def __init__(self, ok: bool = True) -> None:
        self.ok, self.records = ok, []

    async def write(self, records):
        if self.ok:
            self.records += records
        return self.ok


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[tuple] = Counter()

    def inc(self, name, value=1.0, **tags):
        self.counts[(name, *sorted(tags.values()))] += value

    def observe(self, name, value, **tags):
        pass

    def request(self, tiers, degraded, confidences, reasons, seconds):
        for reason in reasons:
            if reason:
                self.counts[("escalations", reason)] += 1


def service(teacher=None, sink=None, draw=lambda: 1.0, **config):
    config = GatewayConfig.model_validate(
        {"student": {"path": "s"}, "teacher": {"path": "t"}, **config}
    )
    teacher, sink, metrics = teacher or Teacher(), sink or Sink(), Metrics()
    return CascadeService(config, ["a", "b"], student, teacher, sink, metrics, draw), teacher, sink


def test_unsure_inputs_go_to_the_teacher_sure_ones_stay_and_escalations_are_logged():
    svc, teacher, sink = service()
    answer = asyncio.run(svc.classify(["sure 1", "unsure 2", "nan 3"], "r1", Routing()))
    tiers = [o.tier for o in answer.outputs]
    assert tiers == ["student", "teacher", "teacher"]  # a NaN confidence escalates
    assert teacher.calls == [["unsure 2", "nan 3"]]
    assert [r.text for r in sink.records] == ["unsure 2", "nan 3"] and answer.logged
    assert {(r.reason, r.teacher_status, r.inclusion_probability) for r in sink.records} == {
        ("low_confidence", "answered", 1.0)
    }
    assert len({r.record_id for r in sink.records}) == 2  # made by the server, one per input


def test_a_client_threshold_is_logged_as_forced():
    svc, _, sink = service()
    asyncio.run(svc.classify(["sure 1"], "r1", Routing(threshold=1.0)))
    assert [r.reason for r in sink.records] == ["forced"]
    assert svc.metrics.counts[("escalations", "forced")] == 1


def test_a_failing_teacher_gives_degraded_student_answers_still_logged():
    svc, _, sink = service(Teacher("fail"))
    answer = asyncio.run(svc.classify(["unsure 1", "sure 2"], "r1", Routing()))
    first, second = answer.outputs
    assert (first.tier, first.degraded, first.escalated) == ("student", True, True)
    assert not second.degraded
    assert [(r.text, r.teacher_status) for r in sink.records] == [("unsure 1", "failed")]
    assert svc.teacher_failing_since is not None
    assert svc.metrics.counts[("protege_teacher_failures", "error")] == 1


def test_the_bulkhead_answers_escalations_beyond_its_bound_at_once_with_the_student():
    async def scenario():
        svc, teacher, sink = service(Teacher("hang"), overload={"teacher_max_in_flight": 2})
        first = asyncio.create_task(svc.classify(["unsure a", "unsure b"], "r1", Routing()))
        while svc.teacher_in_flight < 2:
            await asyncio.sleep(0)
        # the teacher holds two escalations: the next is answered without waiting for it
        shed = await asyncio.wait_for(svc.classify(["unsure c", "sure d"], "r2", Routing()), 5)
        assert [(o.tier, o.degraded) for o in shed.outputs] == [
            ("student", True),
            ("student", False),
        ]
        assert teacher.calls == [["unsure a", "unsure b"]]
        assert [(r.text, r.teacher_status) for r in sink.records] == [("unsure c", "skipped")]
        assert svc.metrics.counts[("protege_teacher_shed",)] == 1
        teacher.release.set()
        held = await first
        assert [o.tier for o in held.outputs] == ["teacher", "teacher"]
        assert svc.teacher_in_flight == 0

    asyncio.run(scenario())


def test_a_request_over_the_bound_gets_the_teacher_for_what_fits():
    async def scenario():
        svc, teacher, _ = service(overload={"teacher_max_in_flight": 1})
        answer = await svc.classify(["unsure a", "unsure b"], "r", Routing())
        assert [(o.tier, o.degraded) for o in answer.outputs] == [
            ("teacher", False),
            ("student", True),
        ]
        assert teacher.calls == [["unsure a"]]

    asyncio.run(scenario())


def test_the_deadline_caps_the_wait_for_the_teacher():
    async def scenario():
        svc, teacher, sink = service(Teacher("hang"), teacher_timeout_s=600)
        routing = Routing(deadline=time.monotonic() + 0.05)
        answer = await asyncio.wait_for(svc.classify(["unsure a"], "r", routing), 30)
        assert answer.outputs[0].degraded and sink.records[0].teacher_status == "timeout"
        # the client's hurry: counted as a deadline, never as a failing teacher
        assert svc.metrics.counts[("protege_teacher_failures", "deadline")] == 1
        assert svc.metrics.counts[("protege_teacher_failures", "timeout")] == 0
        assert svc.teacher_failing_since is None
        spent = Routing(deadline=time.monotonic() - 1)
        answer = await asyncio.wait_for(svc.classify(["unsure b"], "r", spent), 30)
        assert answer.outputs[0].degraded and len(teacher.calls) == 1  # not even asked
        assert svc.metrics.counts[("protege_teacher_failures", "deadline")] == 2

    asyncio.run(scenario())


def test_offline_audits_are_logged_with_the_request_at_their_inclusion_probability():
    svc, teacher, sink = service(
        draw=lambda: 0.0, cascade={"threshold": 0.7, "audit_fraction": 0.1}
    )
    asyncio.run(svc.classify(["sure 1", "sure 2"], "r", Routing()))
    assert teacher.calls == []
    assert {(r.reason, r.teacher_status, r.inclusion_probability) for r in sink.records} == {
        ("audit", "skipped", 0.1)
    }


def test_online_audits_beyond_the_bound_are_deferred_to_offline_never_dropped():
    async def scenario():
        cascade = {"threshold": 0.7, "audit_fraction": 0.5, "audit_teacher": "online"}
        svc, teacher, sink = service(
            Teacher("hang"), draw=lambda: 0.0, cascade=cascade, overload={"audits_max_in_flight": 2}
        )
        await svc.classify(["sure 1", "sure 2"], "r1", Routing())
        await svc.classify(["sure 3"], "r2", Routing())  # two audits wait: this one is deferred
        assert svc.audits_in_flight == 2
        assert svc.metrics.counts[("protege_audits_deferred",)] == 1
        assert [(r.text, r.teacher_status) for r in sink.records] == [("sure 3", "skipped")]
        teacher.release.set()
        while len(sink.records) < 3:  # the two online audits land once the teacher answers
            await asyncio.sleep(0.01)
        assert svc.audits_in_flight == 0
        assert sorted((r.text, r.teacher_status) for r in sink.records) == [
            ("sure 1", "answered"),
            ("sure 2", "answered"),
            ("sure 3", "skipped"),
        ]
        assert {r.inclusion_probability for r in sink.records} == {0.5}

    asyncio.run(scenario())


@pytest.mark.parametrize("ok", [True, False])
def test_the_answer_says_whether_its_records_were_logged(ok):
    svc, _, _ = service(sink=Sink(ok))
    assert asyncio.run(svc.classify(["unsure 1"], "r", Routing())).logged is ok
    assert asyncio.run(svc.classify(["sure 1"], "r", Routing())).logged is None


def test_a_failing_teacher_is_read_without_a_call_and_cleared_by_an_answer():
    async def scenario():
        teacher = Teacher("fail")
        svc, _, _ = service(teacher)
        assert svc.teacher_failing_for() is None
        await svc.classify(["unsure 1"], "r", Routing())
        calls = len(teacher.calls)
        assert svc.teacher_failing_for() is not None
        assert len(teacher.calls) == calls  # reading it asks the teacher nothing
        teacher.mode = "answer"  # (serving.teacher_probe asks it again, on a timer)
        await svc.ask_teacher(["probe"])
        assert svc.teacher_failing_for() is None

    asyncio.run(scenario())


def test_a_cancelled_request_gives_its_bulkhead_places_back():
    async def scenario():
        svc, _, _ = service(Teacher("hang"), overload={"teacher_max_in_flight": 2})
        task = asyncio.create_task(svc.classify(["unsure a", "unsure b"], "r", Routing()))
        while svc.teacher_in_flight < 2:
            await asyncio.sleep(0)
        task.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        assert svc.teacher_in_flight == 0

    asyncio.run(scenario())
