"""The generative cascade's request path without Ray or HTTP: the real service, the real
student generation and the real teacher engine in process (tiny float64 Llamas sharing a
tokenizer), with failing or hanging teachers wrapped around the real one.

Every comparison with the teacher's greedy answer is like with like: the reference is the
teacher's own greedy generation of the same prompt in a batch of one, as the engine runs
each of these requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import pytest
import torch
from generate_support import (
    Failing,
    Hanging,
    Metrics,
    Sink,
    collect,
    config,
    departing,
    student_of,
)
from tiny_lm import build_tiny_lm

from serving.generate.events import (
    Failed,
    Finished,
    GenerationRequest,
    PromptTooLong,
    Routed,
    TextDelta,
)
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat
from serving.generate.scorers import mean_logprob
from serving.generate.service import GenerationService
from serving.generate.student import load_student
from serving.generate.teacher_engine import LocalTeacher, TeacherEngine

MAX = 12
MESSAGES = [{"role": "user", "content": "The cat sat on the mat"}]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return (
        build_tiny_lm(root / "student", seed=2, layers=1),
        build_tiny_lm(root / "teacher", seed=1, layers=3),
    )


@pytest.fixture(scope="module")
def teacher_lm(folders):
    return load_language_model(folders[1], device="cpu")


@pytest.fixture
def engine(teacher_lm):
    return TeacherEngine(teacher_lm, "teacher-1", max_batch_size=8, wait_s=0.0)


@pytest.fixture(scope="module")
def prompt(teacher_lm):
    return render_chat(teacher_lm.tokenizer, MESSAGES)


@pytest.fixture(scope="module")
def reference(teacher_lm, prompt):
    """The teacher's greedy answer to MESSAGES, with its top 4 per token."""
    settings = SamplingSettings(max_new_tokens=MAX)
    answer = generate_batch(teacher_lm, [prompt], settings, top_k=4)[0]
    assert answer.completion_tokens >= 6, "the tiny teacher must write a few tokens"
    return answer


def service(tmp_path, active, teacher, sink=None, draw=lambda: 1.0, **fields):
    metrics = Metrics()
    svc = GenerationService(
        config(tmp_path, **fields), lambda: active, teacher, sink or Sink(), metrics, draw
    )
    return svc, svc.sink, metrics


def request(svc, **fields) -> GenerationRequest:
    values = {
        "request_id": "r1",
        "messages": MESSAGES,
        "prompt_ids": svc.prompt_ids(messages=MESSAGES),
        "settings": SamplingSettings(max_new_tokens=MAX),
    }
    values.update(fields)
    return GenerationRequest(**values)


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# --- a kept answer ----------------------------------------------------------------------


def test_a_kept_answer_streams_from_the_buffer_after_the_decision(tmp_path, folders, engine):
    active = load_student(folders[0], config(tmp_path, threshold=0.0), "cpu")
    svc, sink, metrics = service(tmp_path, active, LocalTeacher(engine))
    req = request(svc, logprobs=2)
    events = asyncio.run(collect(svc.stream(req)))

    own = generate_batch(active.model.lm, [req.prompt_ids], req.settings, top_k=2)[0]
    routed, finished = events[0], events[-1]
    assert isinstance(routed, Routed) and isinstance(finished, Finished)
    # the tier, the confidence and the draft length need the whole answer: decided first
    assert (routed.tier, routed.escalated, routed.degraded, routed.reason) == (
        "student",
        False,
        False,
        None,
    )
    assert routed.confidence == pytest.approx(mean_logprob([own.logprobs])[0])
    assert routed.draft_tokens == own.completion_tokens and routed.draft == "not_asked"
    assert (routed.max_new_tokens, routed.clamped) == (MAX, False)
    assert routed.prompt_tokens == len(req.prompt_ids)
    deltas = [e for e in events[1:-1] if isinstance(e, TextDelta)]
    assert len(deltas) == len(events) - 2 and text_of(events) == own.text
    tokens = [t for d in deltas for t in d.logprobs]
    assert [t.token_id for t in tokens] == own.token_ids
    assert [t.logprob for t in tokens] == pytest.approx(own.logprobs)
    assert all(len(t.top) == len(t.top_ids) == 2 for t in tokens)
    assert finished.finish_reason == own.finish_reason
    assert finished.usage.completion_tokens == finished.usage.student_tokens == len(own.token_ids)
    assert finished.usage.teacher_tokens == 0 and finished.usage.draft_accepted is None
    assert finished.logged is None and sink.records == []  # kept, not audited: no record
    assert engine.batch_sizes == []  # the teacher was never asked
    assert metrics.ends == [("student", "ok", metrics.ends[0][2], None)]
    assert metrics.counts[("tokens", "student")] == own.completion_tokens
    assert metrics.counts[("protege_batch_size", "generate_student")] == 1


def test_prompt_ids_refuse_a_prompt_beyond_the_limit_and_clamp_max_tokens(tmp_path, teacher_lm):
    active = student_of(teacher_lm, digest="x", max_prompt_tokens=8, max_new_tokens=5)
    svc, _, _ = service(tmp_path, active, None)
    with pytest.raises(PromptTooLong) as caught:
        svc.prompt_ids(messages=MESSAGES)
    assert caught.value.limit == 8 and caught.value.tokens > 8
    assert "at most 8" in str(caught.value)
    assert len(svc.prompt_ids(prompt="The cat")) <= 8
    with pytest.raises(ValueError, match="exactly one"):
        svc.prompt_ids()
    assert svc.max_new_tokens() == 5


# --- draft reuse ------------------------------------------------------------------------


@pytest.mark.parametrize("departs_at", [None, 3, 0], ids=["whole", "part", "none"])
def test_a_forced_escalation_is_the_teachers_greedy_answer_from_the_draft(
    tmp_path, engine, teacher_lm, prompt, reference, departs_at
):
    lm = teacher_lm if departs_at is None else departing(teacher_lm, len(prompt) + departs_at)
    active = student_of(lm, digest=engine.digest, max_new_tokens=MAX)
    svc, sink, metrics = service(tmp_path, active, LocalTeacher(engine))
    events = asyncio.run(collect(svc.stream(request(svc, force_tier="teacher"))))

    draft = generate_batch(lm, [prompt], SamplingSettings(max_new_tokens=MAX))[0]
    expected = reference.completion_tokens if departs_at is None else departs_at
    assert draft.token_ids[:expected] == reference.token_ids[:expected]
    routed, finished = events[0], events[-1]
    assert (routed.tier, routed.escalated, routed.reason, routed.draft) == (
        "teacher",
        True,
        "forced",
        "verified",
    )
    assert routed.draft_tokens == draft.completion_tokens
    assert text_of(events) == reference.text
    usage = finished.usage
    assert finished.finish_reason == reference.finish_reason
    assert usage.draft_accepted == expected
    assert usage.draft_rejected == draft.completion_tokens - expected
    assert usage.accepted_draft_share == pytest.approx(expected / draft.completion_tokens)
    assert usage.teacher_tokens == usage.completion_tokens == reference.completion_tokens
    assert usage.student_tokens == draft.completion_tokens
    (record,) = sink.records
    assert (record.reason, record.teacher_status, record.inclusion_probability) == (
        "forced",
        "answered",
        1.0,
    )
    assert record.teacher_text == reference.text and record.student_text == draft.text
    assert (record.draft_tokens, record.draft_accepted) == (draft.completion_tokens, expected)
    assert record.messages[0].content == MESSAGES[0]["content"] and record.prompt is None
    top = record.teacher_top_logprobs
    assert top.tokens == reference.token_ids and top.k == 4
    assert top.ids == [[i for i, _ in p] for p in reference.top_logprobs]
    use, share, _ = metrics.drafts[0]
    assert (use, share) == ("verified", pytest.approx(expected / draft.completion_tokens))
    # the teacher's own tokens: what it wrote past the accepted draft
    assert metrics.counts[("tokens", "teacher")] == reference.completion_tokens - expected
    assert metrics.ends == [("teacher", "ok", metrics.ends[0][2], "forced")]


def test_the_skip_rule_sampling_and_another_tokenizer_send_no_draft(
    tmp_path, engine, teacher_lm, reference
):
    # a cut above every confidence: the draft is mostly wrong, the teacher starts afresh
    unsure = student_of(teacher_lm, digest=engine.digest, draft_min_confidence=1.0)
    other = student_of(teacher_lm, digest="another tokenizer")
    sure = student_of(teacher_lm, digest=engine.digest)
    sampled = SamplingSettings(max_new_tokens=MAX, temperature=0.8, seed=3)
    cases = [
        (unsure, {}, {}),
        (other, {}, {}),
        (sure, {}, {"settings": sampled}),
        (sure, {"draft_reuse": False}, {}),
    ]

    async def scenario():  # one loop: the teacher engine's batcher lives on it
        out = []
        for active, fields, overrides in cases:
            svc, sink, _ = service(tmp_path, active, LocalTeacher(engine), **fields)
            req = request(svc, force_tier="teacher", **overrides)
            out.append((await collect(svc.stream(req)), sink.records))
        return out

    results = asyncio.run(scenario())
    assert [events[0].draft for events, _ in results] == [
        "low_confidence",
        "tokenizer",
        "sampling",
        "disabled",
    ]
    for events, records in results:
        assert isinstance(events[-1], Finished) and events[-1].usage.draft_accepted is None
        assert records[0].draft_tokens is None and records[0].teacher_status == "answered"
    for i in (0, 1, 3):  # greedy: the teacher's greedy answer all the same
        assert text_of(results[i][0]) == reference.text
    assert results[2][1][0].sampling.temperature == 0.8


def test_low_confidence_escalates_and_a_threshold_override_is_forced(
    tmp_path, engine, teacher_lm, reference
):
    active = student_of(teacher_lm, digest=engine.digest, threshold=1.0)  # everything escalates
    svc, sink, metrics = service(tmp_path, active, LocalTeacher(engine))

    async def scenario():
        plain = await collect(svc.stream(request(svc)))
        return plain, await collect(svc.stream(request(svc, threshold=0.999999)))

    events, overridden = asyncio.run(scenario())
    assert (events[0].tier, events[0].reason, events[0].threshold) == (
        "teacher",
        "low_confidence",
        1.0,
    )
    assert text_of(events) == reference.text
    assert overridden[0].reason == "forced"  # the client chose the routing
    assert [r.reason for r in sink.records] == ["low_confidence", "forced"]
    assert [end[3] for end in metrics.ends] == ["low_confidence", "forced"]


# --- the teacher failing ----------------------------------------------------------------


def test_a_teacher_failing_before_its_first_token_leaves_the_students_answer(
    tmp_path, engine, teacher_lm
):
    student_lm = departing(teacher_lm, 1)
    active = student_of(student_lm, digest=engine.digest)
    svc, sink, metrics = service(tmp_path, active, Failing(LocalTeacher(engine), after=0))
    events = asyncio.run(collect(svc.stream(request(svc, force_tier="teacher"))))
    own = generate_batch(student_lm, [svc.prompt_ids(messages=MESSAGES)], SamplingSettings(MAX))
    routed = events[0]
    assert (routed.tier, routed.escalated, routed.degraded, routed.draft) == (
        "student",
        True,
        True,
        "not_asked",
    )
    assert text_of(events) == own[0].text and isinstance(events[-1], Finished)
    (record,) = sink.records
    assert (record.teacher_status, record.teacher_text, record.draft_tokens) == (
        "failed",
        None,
        None,
    )
    assert events[-1].logged is True
    assert metrics.ends == [("student", "degraded", metrics.ends[0][2], "forced")]
    assert svc.teacher_failing_for() is not None
    assert svc.teacher_in_flight == 0


def test_a_teacher_silent_past_its_timeout_leaves_the_students_answer(tmp_path, engine, teacher_lm):
    active = student_of(teacher_lm, digest=engine.digest)
    hanging = Hanging(LocalTeacher(engine), after=0)
    svc, sink, metrics = service(tmp_path, active, hanging, teacher_timeout_s=0.05)
    events = asyncio.run(collect(svc.stream(request(svc, force_tier="teacher"))))
    assert (events[0].tier, events[0].degraded) == ("student", True)
    assert sink.records[0].teacher_status == "timeout"
    assert hanging.closed == 1  # the teacher's stream was closed, its work cancelled
    assert metrics.counts[("answered", "student", "degraded")] == 1
    assert svc.teacher_failing_for() is not None


def test_a_spent_deadline_never_asks_the_teacher(tmp_path, engine, teacher_lm):
    active = student_of(teacher_lm, digest=engine.digest)
    failing = Failing(LocalTeacher(engine), after=99)
    svc, sink, _ = service(tmp_path, active, failing)
    req = request(svc, force_tier="teacher", deadline=time.monotonic() - 1)
    events = asyncio.run(collect(svc.stream(req)))
    assert events[0].degraded and failing.requests == []
    assert sink.records[0].teacher_status == "timeout"
    assert svc.teacher_failing_for() is None  # the client's hurry, not the teacher's failure


def test_a_teacher_failing_after_its_first_token_fails_the_answer(
    tmp_path, engine, teacher_lm, reference
):
    active = student_of(departing(teacher_lm, 2), digest=engine.digest)
    svc, sink, metrics = service(tmp_path, active, Failing(LocalTeacher(engine), after=1))
    events = asyncio.run(collect(svc.stream(request(svc, force_tier="teacher"))))
    assert isinstance(events[0], Routed) and events[0].tier == "teacher"
    assert not events[0].degraded
    assert isinstance(events[-1], Failed) and "mid-answer" in events[-1].message
    assert events[-1].kind == "failed" and events[-1].logged is True
    assert reference.text.startswith(text_of(events))  # what went out is the teacher's
    (record,) = sink.records
    assert (record.teacher_status, record.teacher_text, record.draft_accepted) == (
        "failed",
        None,
        None,
    )
    assert metrics.counts[("answered", "teacher", "failed")] == 1


def test_the_bulkhead_sheds_an_escalation_beyond_its_bound(tmp_path, engine, teacher_lm):
    active = student_of(teacher_lm, digest=engine.digest)
    hanging = Hanging(LocalTeacher(engine), after=0)
    svc, sink, metrics = service(tmp_path, active, hanging, overload={"teacher_max_in_flight": 1})

    async def scenario():
        first = asyncio.ensure_future(collect(svc.stream(request(svc, force_tier="teacher"))))
        while hanging.waiting == 0:
            await asyncio.sleep(0.001)
        shed = await collect(svc.stream(request(svc, request_id="r2", force_tier="teacher")))
        hanging.release.set()
        return await first, shed

    held, shed = asyncio.run(scenario())
    assert held[0].tier == "teacher" and not held[0].degraded
    assert (shed[0].tier, shed[0].degraded, shed[0].escalated) == ("student", True, True)
    statuses = {r.request_id: r.teacher_status for r in sink.records}
    assert statuses == {"r1": "answered", "r2": "skipped"}
    assert metrics.counts[("answered", "student", "degraded")] == 1


# --- a consumer that goes away ----------------------------------------------------------


def test_an_abandoned_stream_is_logged_once_as_cancelled(tmp_path, engine, teacher_lm):
    active = student_of(departing(teacher_lm, 3), digest=engine.digest)
    hanging = Hanging(LocalTeacher(engine), after=1)
    svc, sink, metrics = service(tmp_path, active, hanging)

    async def scenario():
        events = svc.stream(request(svc, force_tier="teacher"))
        async with contextlib.aclosing(events):
            routed = await anext(events)  # the teacher's first token came
            await anext(events)
            # the client goes away while the teacher is still writing
        for _ in range(50):
            await asyncio.sleep(0)
        return routed

    routed = asyncio.run(scenario())
    assert routed.tier == "teacher"
    (record,) = sink.records
    assert (record.teacher_status, record.reason, record.teacher_text) == (
        "cancelled",
        "forced",
        None,
    )
    assert hanging.closed == 1 and svc.teacher_in_flight == 0 and sink.writes == 1
    assert metrics.ends == [("teacher", "cancelled", metrics.ends[0][2], "forced")]


def test_a_request_cancelled_before_the_first_token_is_logged_cancelled(
    tmp_path, engine, teacher_lm
):
    active = student_of(teacher_lm, digest=engine.digest)
    hanging = Hanging(LocalTeacher(engine), after=0)
    svc, sink, metrics = service(tmp_path, active, hanging)

    async def scenario():
        task = asyncio.ensure_future(collect(svc.stream(request(svc, force_tier="teacher"))))
        while hanging.waiting == 0:
            await asyncio.sleep(0.001)
        task.cancel()  # e.g. the HTTP server cancels the response: the client left
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(50):
            await asyncio.sleep(0)

    asyncio.run(scenario())
    (record,) = sink.records
    assert record.teacher_status == "cancelled" and record.draft_tokens is None
    assert hanging.closed == 1 and svc.teacher_in_flight == 0
    assert metrics.ends == [("teacher", "cancelled", None, "forced")]  # no first byte


def test_a_kept_audited_answer_abandoned_midway_is_still_logged_once(tmp_path, engine, teacher_lm):
    active = student_of(teacher_lm, digest=engine.digest)
    svc, sink, _ = service(
        tmp_path, active, LocalTeacher(engine), draw=lambda: 0.0, audit_fraction=0.25
    )

    async def scenario():
        events = svc.stream(request(svc))
        async with contextlib.aclosing(events):
            await anext(events)
        for _ in range(50):
            await asyncio.sleep(0)

    asyncio.run(scenario())
    (record,) = sink.records
    assert (record.reason, record.inclusion_probability, record.teacher_status) == (
        "audit",
        0.25,
        "skipped",
    )


# --- the log ----------------------------------------------------------------------------


def test_every_escalated_and_audited_answer_gets_exactly_one_record(tmp_path, engine, teacher_lm):
    """Forty requests: kept, audited, escalated; the teacher failing on every third
    escalation (before its first token, or after it); each logged input once."""
    active = student_of(departing(teacher_lm, 2), digest=engine.digest)
    local = LocalTeacher(engine)

    class Flaky:
        def __init__(self):
            self.calls = 0

        async def info(self):
            return await local.info()

        def stream(self, req):
            self.calls += 1
            if self.calls % 3 == 0:
                return Failing(local, after=self.calls % 2).stream(req)
            return local.stream(req)

    draws = iter([0.05, 0.9] * 40)
    svc, sink, metrics = service(
        tmp_path, active, Flaky(), draw=lambda: next(draws), audit_fraction=0.1
    )

    async def scenario():
        plan = []
        for i in range(40):
            force = "teacher" if i % 4 == 0 else None
            plan.append((f"r{i}", force))
        runs = [
            collect(svc.stream(request(svc, request_id=rid, force_tier=force)))
            for rid, force in plan
        ]
        return plan, await asyncio.gather(*runs)

    plan, results = asyncio.run(scenario())
    escalated = {rid for (rid, _), events in zip(plan, results, strict=True) if events[0].escalated}
    assert escalated == {rid for rid, force in plan if force}
    audited = {r.request_id for r in sink.records if r.reason == "audit"}
    assert audited and not audited & escalated
    assert len(sink.records) == len(escalated) + len(audited)
    assert len({r.request_id for r in sink.records}) == len(sink.records)
    assert {r.request_key for r in sink.records}.__len__() == len(sink.records)
    failed = [r for r in sink.records if r.teacher_status == "failed"]
    assert failed and all(r.reason == "forced" for r in failed)
    assert [end[3] for end in metrics.ends].count("audit") == len(audited)
    assert len(metrics.ends) == 40
    for record in sink.records:
        assert not math.isnan(record.confidence)


def test_a_buffered_answer_splits_into_whole_characters(teacher_lm):
    """Byte-level tokens split non-Latin characters: a delta never ends inside one, and
    the deltas add up to the answer, token for token."""
    from serving.generate.deltas import buffered_deltas
    from serving.generate.models import render_completion

    tokenizer = teacher_lm.tokenizer
    prompts = [render_completion(tokenizer, p) for p in ("Кошка сидит", "猫坐在", "The dog")]
    settings = SamplingSettings(max_new_tokens=16, stop=("。",))
    for answer in generate_batch(teacher_lm, prompts, settings, top_k=2):
        deltas = buffered_deltas(answer, tokenizer, want=1)
        assert "".join(d.text for d in deltas) == answer.text
        assert [t.token_id for d in deltas for t in d.logprobs] == answer.token_ids
        assert all(len(t.top) == 1 for d in deltas for t in d.logprobs)
        if "\ufffd" not in answer.text:
            assert not any("\ufffd" in d.text for d in deltas)
        assert [d.text for d in buffered_deltas(answer, tokenizer, None)] == [
            d.text for d in deltas if d.text
        ]


def test_the_readiness_probe_call_clears_or_counts_a_failing_teacher(tmp_path, engine, teacher_lm):
    active = student_of(teacher_lm, digest=engine.digest)
    failing = Failing(LocalTeacher(engine), after=0)
    svc, _, _ = service(tmp_path, active, failing)

    async def scenario():
        broken = await svc.ask_teacher(["readiness probe"])
        failing_for = svc.teacher_failing_for()
        svc._teacher = LocalTeacher(engine)  # the teacher comes back
        return broken, failing_for, await svc.ask_teacher(["readiness probe"])

    broken, failing_for, (done, status) = asyncio.run(scenario())
    assert broken == (None, "failed") and failing_for is not None
    assert status == "answered" and done[0].completion_tokens <= 1
    assert svc.teacher_failing_for() is None
