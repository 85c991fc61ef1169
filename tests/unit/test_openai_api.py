"""The OpenAI-compatible routes in process (no Ray, no model): request validation (400s
naming the parameter), the prompt limit, the service's events as OpenAI's bodies and SSE
chunks (read by the official ``openai`` client), the routing metadata in ``protege`` and
the ``x-protege-*`` headers, errors in OpenAI's shape (the guard's included), a failure
mid-stream, and a stream the client abandons.

The generation service is replaced by :class:`ScriptedCascade`, which emits the real event
types of :mod:`serving.generate.events`; the routes are the thing tested.
"""

import asyncio
import json
import math

import httpx
import openai
import pytest
from fastapi import Depends, FastAPI
from fastapi.security import HTTPBearer
from fastapi.testclient import TestClient

from serving.access import Gatekeeper, new_key
from serving.config import LimitsConfig
from serving.errors import install_error_handlers
from serving.generate.events import (
    Failed,
    Finished,
    GenerationRequest,
    PromptTooLong,
    Routed,
    TextDelta,
    TokenLogprob,
    Usage,
)
from serving.generate.openai_api import add_openai_routes
from serving.guard import Guard

PLAIN, PLAIN_ENTRY = new_key("plain")
STEER, STEER_ENTRY = new_key("steer", overrides=True)
LIMITS = LimitsConfig(max_body_bytes=4000)
MAX_NEW, MAX_PROMPT = 16, 12
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "hello there"}]


def routed(request: GenerationRequest, tier: str = "student", **kw) -> Routed:
    fields = dict(
        tier=tier,
        escalated=tier == "teacher",
        degraded=False,
        reason="low_confidence" if tier == "teacher" else None,
        confidence=0.8 if tier == "student" else 0.2,
        threshold=0.5,
        student_version="s-1",
        teacher_version="t-1",
        draft="verified" if tier == "teacher" else "not_asked",
        draft_tokens=3,
        draft_accepted=None,
        max_new_tokens=request.settings.max_new_tokens,
        clamped=(request.requested_max_tokens or 0) > request.settings.max_new_tokens,
        prompt_tokens=len(request.prompt_ids),
    )
    return Routed(**(fields | kw))


def delta(text: str, request: GenerationRequest, logprob: float = -0.25) -> TextDelta:
    if request.logprobs is None:
        return TextDelta(text)
    top = [(text, logprob), ("other", -3.0), ("third", -4.0)][: request.logprobs]
    return TextDelta(text, [TokenLogprob(text, logprob, top)])


def kept(request: GenerationRequest):
    """A kept answer: the student's, streamed from its buffer."""
    yield routed(request)
    yield delta("Hello", request)
    yield delta(" world", request)
    usage = Usage(prompt_tokens=len(request.prompt_ids), completion_tokens=2, student_tokens=2)
    yield Finished("stop", usage, logged=None)


def escalated(request: GenerationRequest):
    """An escalated answer: the teacher kept 2 of the student's 3 draft tokens."""
    yield routed(request, "teacher")
    yield delta("Good", request)
    yield delta(" day", request)
    yield delta(" to you", request)
    usage = Usage(
        prompt_tokens=len(request.prompt_ids),
        completion_tokens=4,
        student_tokens=3,
        teacher_tokens=4,
        teacher_prompt_tokens=9,
        draft_accepted=2,
        draft_rejected=1,
        accepted_draft_share=2 / 3,
        teacher_seconds=0.5,
        teacher_seconds_saved=0.25,
    )
    yield Finished("length", usage, logged=True)


def broken(request: GenerationRequest):
    """The teacher fails after its first token."""
    yield routed(request, "teacher")
    yield delta("Good", request)
    yield Failed("the teacher failed mid-answer (RuntimeError: secret detail)", "failed", True)


class ScriptedCascade:
    """Stands in for the generation service: whitespace tokens, scripted events."""

    def __init__(self, script=kept) -> None:
        self.script = script
        self.requests: list[GenerationRequest] = []
        self.closed = 0
        self.limit = MAX_PROMPT

    def prompt_ids(self, messages=None, prompt=None) -> list[int]:
        if (messages is None) == (prompt is None):
            raise ValueError("give exactly one of messages and prompt")
        text = prompt if prompt is not None else " ".join(m["content"] for m in messages)
        ids = list(range(len(text.split()) + (0 if prompt is not None else 2)))
        if len(ids) > self.limit:
            raise PromptTooLong(len(ids), self.limit)
        return ids

    def max_new_tokens(self) -> int:
        return MAX_NEW

    async def stream(self, request: GenerationRequest):
        self.requests.append(request)
        try:
            for event in self.script(request):
                await asyncio.sleep(0)
                yield event
        finally:
            self.closed += 1


class Backend:
    def __init__(self, cascade: ScriptedCascade) -> None:
        self.cascade = cascade

    def hosted(self) -> dict[str, str]:
        return {"headlines": "generate", "topics": "classify"}

    def generator(self, name: str) -> ScriptedCascade:
        assert name == "headlines"
        return self.cascade

    def request_id(self, given: str | None) -> str:
        return given or "req-1"


def make_app(script=kept, keys=(PLAIN_ENTRY, STEER_ENTRY)) -> tuple[FastAPI, ScriptedCascade]:
    """The routes wired as serving.http_api.build_api wires its own: error handlers, the
    routes, the guard in front."""
    cascade = ScriptedCascade(script)
    gatekeeper = Gatekeeper(list(keys))
    api = FastAPI()
    install_error_handlers(api)
    auth = [Depends(HTTPBearer(auto_error=False))] if gatekeeper.enabled else []
    add_openai_routes(api, Backend(cascade), LIMITS, gatekeeper, auth)
    api.add_middleware(
        Guard, gatekeeper=gatekeeper, max_body_bytes=LIMITS.body_bytes, on_reject=lambda: None
    )
    return api, cascade


def client_for(app: FastAPI, key: str = PLAIN) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key=key, http_client=TestClient(app), max_retries=0
    )


def post(app: FastAPI, path: str, body, key: str | None = PLAIN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(app).post(path, json=body, headers=headers | kw.pop("headers", {}), **kw)


def events_of(response: httpx.Response) -> list[str]:
    """The data of each server-sent event, checking the framing on the way."""
    text = response.text
    assert text.endswith("\n\n")
    blocks = text.split("\n\n")[:-1]
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), text
    return [block.removeprefix("data: ") for block in blocks]


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- answers -------------------------------------------------------------------------------


def test_a_chat_answer_through_the_official_client():
    app, cascade = make_app()
    raw = client_for(app).chat.completions.with_raw_response.create(
        model="headlines", messages=HELLO, user="someone"
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.id == "chatcmpl-req-1"
    assert completion.model == "headlines"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hello world"
    assert choice.finish_reason == "stop" and choice.logprobs is None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 2, 6)
    details = usage.completion_tokens_details
    assert details.model_extra == {"student_tokens": 2, "teacher_tokens": 0}
    assert details.accepted_prediction_tokens == details.rejected_prediction_tokens == 0
    meta = completion.protege
    assert meta["tier"] == "student" and meta["escalated"] is False and meta["reason"] is None
    assert meta["confidence"] == 0.8 and meta["threshold"] == 0.5
    assert meta["draft"] == "not_asked" and meta["draft_tokens"] is None
    assert meta["request_id"] == "req-1"
    headers = raw.headers
    assert headers["x-protege-tier"] == "student"
    assert headers["x-protege-model-version"] == "s-1"
    assert headers["x-protege-escalated"] == "false"
    assert headers["x-protege-confidence"] == "0.8"
    assert "x-protege-reason" not in headers  # null fields have no header
    [request] = cascade.requests
    assert request.messages == [{"role": "user", "content": "hello there"}]
    assert request.prompt is None and list(request.prompt_ids) == [0, 1, 2, 3]
    assert cascade.closed == 1


def test_a_completion_through_the_official_client():
    app, cascade = make_app()
    completion = client_for(app).completions.create(model="headlines", prompt="Once upon")
    assert completion.object == "text_completion" and completion.id == "cmpl-req-1"
    assert completion.choices[0].text == "Hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 2 and completion.usage.total_tokens == 4
    assert cascade.requests[0].prompt == "Once upon" and cascade.requests[0].messages is None


def test_an_escalated_answer_counts_the_teacher_apart_and_says_what_the_draft_saved():
    app, _ = make_app(escalated)
    raw = client_for(app).chat.completions.with_raw_response.create(
        model="headlines", messages=HELLO
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "Good day to you"
    assert completion.choices[0].finish_reason == "length"
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (4, 4, 8)
    details = usage.completion_tokens_details
    assert details.accepted_prediction_tokens == 2 and details.rejected_prediction_tokens == 1
    assert details.model_extra == {"student_tokens": 3, "teacher_tokens": 4}
    assert usage.prompt_tokens_details.model_extra == {"teacher_prompt_tokens": 9}
    meta = completion.protege
    assert meta["tier"] == "teacher" and meta["escalated"] and meta["reason"] == "low_confidence"
    assert meta["draft"] == "verified" and meta["draft_tokens"] == 3
    assert meta["draft_accepted"] == 2 and meta["accepted_draft_share"] == pytest.approx(2 / 3)
    assert meta["teacher_seconds"] == 0.5 and meta["teacher_seconds_saved"] == 0.25
    assert meta["logged"] is True
    assert raw.headers["x-protege-tier"] == "teacher"
    assert raw.headers["x-protege-model-version"] == "t-1"
    assert raw.headers["x-protege-student-version"] == "s-1"
    assert raw.headers["x-protege-draft"] == "verified"
    assert raw.headers["x-protege-draft-tokens"] == "3"


def test_a_degraded_answer_and_a_nan_confidence_say_so():
    def degraded(request):
        yield routed(request, degraded=True, escalated=True, reason="low_confidence")
        yield from list(kept(request))[1:]

    app, _ = make_app(degraded)
    raw = client_for(app).chat.completions.with_raw_response.create(
        model="headlines", messages=HELLO
    )
    assert raw.headers["x-protege-degraded"] == "true"
    assert raw.parse().protege["degraded"] is True

    def empty(request):
        yield routed(request, confidence=math.nan)
        yield Finished("stop", Usage(4, 0, 0))

    app, _ = make_app(empty)
    response = post(app, CHAT, {"model": "headlines", "messages": HELLO})
    assert response.status_code == 200
    assert response.json()["protege"]["confidence"] is None  # JSON has no NaN
    assert response.json()["choices"][0]["message"]["content"] == ""
    assert "x-protege-confidence" not in response.headers


def test_sampling_settings_reach_the_service():
    app, cascade = make_app()
    client = client_for(app)
    client.chat.completions.create(
        model="headlines",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}],
            },
        ],
        temperature=0.7,
        top_p=0.9,
        stop=["\n", "END"],
        seed=7,
        max_completion_tokens=5,
    )
    request = cascade.requests[-1]
    settings = request.settings
    assert (settings.temperature, settings.top_p, settings.seed) == (0.7, 0.9, 7)
    assert settings.stop == ("\n", "END") and settings.max_new_tokens == 5
    assert request.requested_max_tokens == 5
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a b"},
    ]
    client.completions.create(model="headlines", prompt="x", stop="\n")
    settings = cascade.requests[-1].settings
    assert settings.stop == ("\n",) and settings.temperature == 0.0  # protege's default: greedy
    assert settings.top_p == 1.0 and settings.max_new_tokens == MAX_NEW


def test_a_conversation_sends_the_previous_answer_back_as_the_client_returned_it():
    app, cascade = make_app()
    client = client_for(app)
    answer = client.chat.completions.create(model="headlines", messages=HELLO)
    follow_up = [*HELLO, answer.choices[0].message, {"role": "user", "content": "more"}]
    client.chat.completions.create(model="headlines", messages=follow_up)
    assert cascade.requests[-1].messages == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "Hello world"},
        {"role": "user", "content": "more"},
    ]


def test_max_tokens_beyond_the_version_is_clamped_and_the_clamp_reported():
    app, cascade = make_app()
    raw = client_for(app).chat.completions.with_raw_response.create(
        model="headlines", messages=HELLO, max_tokens=1000
    )
    assert cascade.requests[0].settings.max_new_tokens == MAX_NEW
    assert cascade.requests[0].requested_max_tokens == 1000
    assert raw.parse().protege["max_tokens"] == MAX_NEW
    assert raw.parse().protege["max_tokens_clamped"] is True
    assert raw.headers["x-protege-max-tokens"] == str(MAX_NEW)
    assert raw.headers["x-protege-max-tokens-clamped"] == "true"


def test_request_id_and_timeout_headers_reach_the_service():
    app, cascade = make_app()
    response = post(
        app,
        CHAT,
        {"model": "headlines", "messages": HELLO},
        headers={"x-request-id": "abc", "x-protege-timeout-ms": "5000"},
    )
    assert response.json()["id"] == "chatcmpl-abc"
    request = cascade.requests[0]
    assert request.request_id == "abc" and request.deadline is not None
    assert post(app, CHAT, {"model": "headlines", "messages": HELLO}).status_code == 200
    assert cascade.requests[1].deadline is None


def test_chat_logprobs_in_openai_shape():
    app, cascade = make_app()
    completion = client_for(app).chat.completions.create(
        model="headlines", messages=HELLO, logprobs=True, top_logprobs=2
    )
    assert cascade.requests[0].logprobs == 2
    content = completion.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hello", " world"]
    assert content[0].logprob == -0.25 and content[0].bytes == list(b"Hello")
    assert [(t.token, t.logprob) for t in content[1].top_logprobs] == [
        (" world", -0.25),
        ("other", -3.0),
    ]
    client_for(app).chat.completions.create(model="headlines", messages=HELLO, logprobs=True)
    assert cascade.requests[1].logprobs == 0  # the tokens' own, no alternatives
    client_for(app).chat.completions.create(model="headlines", messages=HELLO, logprobs=False)
    assert cascade.requests[2].logprobs is None


def test_completion_logprobs_in_openai_shape():
    app, cascade = make_app()
    completion = client_for(app).completions.create(model="headlines", prompt="Once", logprobs=1)
    assert cascade.requests[0].logprobs == 1
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == ["Hello", " world"]
    assert logprobs.token_logprobs == [-0.25, -0.25]
    assert logprobs.top_logprobs == [{"Hello": -0.25}, {" world": -0.25}]
    assert logprobs.text_offset == [0, 5]


# --- streaming -----------------------------------------------------------------------------


def test_a_chat_stream_through_the_official_client():
    app, cascade = make_app()
    with client_for(app).chat.completions.with_streaming_response.create(
        model="headlines", messages=HELLO, stream=True, stream_options={"include_usage": True}
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-protege-tier"] == "student"  # the tier, with the first byte
        chunks = list(raw.parse())
    first, *middle, last, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.protege["tier"] == "student" and first.protege["logged"] is None
    assert "".join(c.choices[0].delta.content for c in middle) == "Hello world"
    assert all(c.object == "chat.completion.chunk" and c.id == "chatcmpl-req-1" for c in chunks)
    assert all(c.usage is None for c in chunks[:-1])
    assert last.choices[0].finish_reason == "stop" and last.protege["tier"] == "student"
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == 6
    assert usage_chunk.protege["request_id"] == "req-1"
    assert cascade.closed == 1


def test_sse_framing_and_done():
    app, _ = make_app(escalated)
    response = post(app, COMPLETIONS, {"model": "headlines", "prompt": "Once upon", "stream": True})
    data = events_of(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Good day to you"
    assert chunks[0]["protege"]["tier"] == "teacher"  # the first chunk says who answers
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["protege"]["draft_accepted"] == 2  # the last one says all of it
    assert all("usage" not in c for c in chunks)  # not asked for
    assert all("protege" not in c for c in chunks[1:-1])
    assert response.headers["x-protege-draft-tokens"] == "3"
    response = post(app, CHAT, CHAT_BODY | {"stream": True})
    chunks = [json.loads(d) for d in events_of(response)[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    # as OpenAI's: the role once, then only content, and an empty delta with the finish
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Good"},
        {"content": " day"},
        {"content": " to you"},
        {},
    ]


def test_a_completion_stream_with_usage_and_logprobs_through_the_official_client():
    app, _ = make_app()
    chunks = list(
        client_for(app).completions.create(
            model="headlines",
            prompt="Once",
            stream=True,
            logprobs=1,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    assert [c.choices[0].logprobs.tokens for c in text_chunks] == [["Hello"], [" world"]]
    assert [c.choices[0].logprobs.text_offset for c in text_chunks] == [[0], [5]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2


def test_a_teacher_failing_mid_stream_is_an_error_event_the_client_raises():
    app, cascade = make_app(broken)
    stream = client_for(app).chat.completions.create(model="headlines", messages=HELLO, stream=True)
    received = []
    with pytest.raises(openai.APIError, match="the teacher failed mid-answer") as caught:
        for chunk in stream:
            received.append(chunk)
    assert received[0].protege["tier"] == "teacher"
    assert "".join(c.choices[0].delta.content or "" for c in received) == "Good"
    assert caught.value.body["code"] == "teacher_failed"
    assert "secret detail" not in caught.value.message  # the reason stays in the log
    response = post(app, CHAT, {"model": "headlines", "messages": HELLO, "stream": True})
    data = events_of(response)
    assert "[DONE]" not in data  # the stream ends at the error
    assert json.loads(data[-1])["error"]["type"] == "server_error"
    assert cascade.closed == 2


def test_a_service_crash_mid_stream_is_an_error_event_too():
    def crash(request):
        yield routed(request)
        raise RuntimeError("boom")

    app, _ = make_app(crash)
    response = post(app, COMPLETIONS, {"model": "headlines", "prompt": "x", "stream": True})
    data = events_of(response)
    error = json.loads(data[-1])["error"]
    assert error["type"] == "server_error" and "boom" not in error["message"]
    assert "[DONE]" not in data


def test_a_failure_without_streaming_is_a_5xx_in_openai_shape():
    app, _ = make_app(broken)
    response = post(app, CHAT, {"model": "headlines", "messages": HELLO})
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "teacher_failed" and error["type"] == "server_error"
    assert response.headers["x-protege-tier"] == "teacher"

    def timeout(request):
        yield routed(request, "teacher")
        yield Failed("the teacher timed out mid-answer", "timeout", True)

    app, _ = make_app(timeout)
    response = post(app, CHAT, {"model": "headlines", "messages": HELLO})
    assert response.status_code == 504 and error_of(response)["code"] == "teacher_timeout"
    with pytest.raises(openai.InternalServerError):
        client_for(app).chat.completions.create(model="headlines", messages=HELLO)


def test_a_student_failing_before_the_tier_is_a_500_without_its_reason():
    def crash(request):
        raise RuntimeError("student exploded at /secret/path")
        yield  # pragma: no cover

    app, _ = make_app(crash)
    for stream in (False, True):
        response = post(app, CHAT, {"model": "headlines", "messages": HELLO, "stream": stream})
        assert response.status_code == 500
        error = error_of(response)
        assert error["type"] == "server_error" and "secret" not in error["message"]


def asgi_scope(path: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {PLAIN}".encode()),
            (b"content-type", b"application/json"),
        ],
        "client": ("test", 1),
        "server": ("testserver", 80),
    }


def abandon(app: FastAPI, leave_when: asyncio.Event, stall_after: int | None) -> list[bytes]:
    """Stream a chat and leave (``http.disconnect``) once ``leave_when`` is set; with
    ``stall_after``, sends after that many body messages never complete (a client that
    stopped reading)."""

    async def run() -> list[bytes]:
        body = json.dumps({"model": "headlines", "messages": HELLO, "stream": True}).encode()
        sent: list[bytes] = []
        started = False

        async def receive():
            nonlocal started
            if not started:
                started = True
                return {"type": "http.request", "body": body, "more_body": False}
            await leave_when.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body":
                if stall_after is not None and len(sent) >= stall_after:
                    leave_when.set()
                    await asyncio.Event().wait()
                sent.append(message.get("body", b""))

        await asyncio.wait_for(app(asgi_scope(CHAT), receive, send), 10)
        return sent

    return asyncio.run(run())


def test_a_client_leaving_while_the_teacher_generates_closes_the_service_stream():
    """The cancellation reaches the service's stream where it waits on the teacher: its
    cleanup runs there (the real service starts its record's write without awaiting)."""
    closed = []

    async def waits_on_the_teacher(request):
        try:
            yield routed(request, "teacher")
            yield delta("Good", request)
            teacher_waiting.set()
            await asyncio.Event().wait()  # the teacher never answers
        finally:
            closed.append(request.request_id)

    teacher_waiting = asyncio.Event()
    app, cascade = make_app()
    cascade.stream = waits_on_the_teacher  # type: ignore[method-assign]
    sent = abandon(app, teacher_waiting, stall_after=None)
    assert any(b"Good" in chunk for chunk in sent)
    assert closed == ["req-1"]


def test_a_client_leaving_mid_send_closes_the_service_stream_shielded():
    """The client stops reading: the route, not the garbage collector, closes the service's
    stream, and its cleanup may await (it is shielded from the request's cancellation)."""
    logged = []

    async def long_answer(request):
        try:
            yield routed(request, "teacher")
            for word in ("one", " two", " three", " four"):
                yield delta(word, request)
        finally:
            await asyncio.sleep(0.01)  # the record's write
            logged.append(request.request_id)

    app, cascade = make_app()
    cascade.stream = long_answer  # type: ignore[method-assign]
    sent = abandon(app, asyncio.Event(), stall_after=2)
    assert len(sent) == 2 and b"four" not in b"".join(sent)
    assert logged == ["req-1"]


# --- validation: 400 naming the parameter --------------------------------------------------

CHAT_BODY = {"model": "headlines", "messages": HELLO}
COMPLETION_BODY = {"model": "headlines", "prompt": "Once"}
INVALID = [
    # (route, change to the body, param, code)
    (CHAT, {"temperature": 2.5}, "temperature", "invalid_value"),
    (CHAT, {"temperature": "hot"}, "temperature", "invalid_type"),
    (CHAT, {"top_p": 0}, "top_p", "invalid_value"),
    (CHAT, {"top_p": 1.5}, "top_p", "invalid_value"),
    (CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    (CHAT, {"stop": ""}, "stop", "invalid_value"),
    (CHAT, {"stop": ["a", ""]}, "stop[1]", "invalid_value"),
    (CHAT, {"stop": 3}, "stop", "invalid_type"),
    (CHAT, {"seed": 2**64}, "seed", "invalid_value"),
    (CHAT, {"seed": 1.5}, "seed", "invalid_type"),
    (CHAT, {"max_tokens": 0}, "max_tokens", "invalid_value"),
    (CHAT, {"max_tokens": "10"}, "max_tokens", "invalid_type"),
    (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
    (CHAT, {"logprobs": "yes"}, "logprobs", "invalid_type"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    (CHAT, {"stream": "yes"}, "stream", "invalid_type"),
    (CHAT, {"stream": True, "stream_options": {"x": 1}}, "stream_options.x", "unknown_parameter"),
    (CHAT, {"protege": {"force_tier": "oracle"}}, "protege.force_tier", "invalid_value"),
    (CHAT, {"protege": {"threshold": 2}}, "protege.threshold", "invalid_value"),
    (CHAT, {"protege": {"steer": 1}}, "protege.steer", "unknown_parameter"),
    (CHAT, {"model": ""}, "model", "invalid_value"),
    (CHAT, {"model": None}, "model", "invalid_type"),
    (CHAT, {"messages": []}, "messages", "invalid_value"),
    (CHAT, {"messages": "hi"}, "messages", "invalid_type"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    (
        CHAT,
        {"messages": [{"role": "tool", "content": "x"}]},
        "messages[0].role",
        "unsupported_parameter",
    ),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content",
        "unsupported_parameter",
    ),
    (
        CHAT,
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
        "messages[0].tool_calls",
        "unsupported_parameter",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x", "mood": 1}]},
        "messages[0].mood",
        "unknown_parameter",
    ),
    (CHAT, {"n": 2}, "n", "unsupported_parameter"),
    (CHAT, {"tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    (CHAT, {"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    (CHAT, {"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    (CHAT, {"function_call": "auto"}, "function_call", "unsupported_parameter"),
    (
        CHAT,
        {"response_format": {"type": "json_object"}},
        "response_format",
        "unsupported_parameter",
    ),
    (CHAT, {"logit_bias": {"50256": -100}}, "logit_bias", "unsupported_parameter"),
    (CHAT, {"presence_penalty": 0.5}, "presence_penalty", "unsupported_parameter"),
    (CHAT, {"frequency_penalty": 1}, "frequency_penalty", "unsupported_parameter"),
    (CHAT, {"parallel_tool_calls": True}, "parallel_tool_calls", "unsupported_parameter"),
    (CHAT, {"audio": {"voice": "x"}}, "audio", "unsupported_parameter"),
    (CHAT, {"modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    (CHAT, {"nonsense": 1}, "nonsense", "unknown_parameter"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, "prompt", "unsupported_parameter"),
    (COMPLETIONS, {"prompt": [1, 2, 3]}, "prompt", "unsupported_parameter"),
    (COMPLETIONS, {"prompt": ""}, "prompt", "invalid_value"),
    (COMPLETIONS, {"logprobs": 6}, "logprobs", "invalid_value"),
    (COMPLETIONS, {"logprobs": True}, "logprobs", "invalid_type"),
    (COMPLETIONS, {"best_of": 2}, "best_of", "unsupported_parameter"),
    (COMPLETIONS, {"echo": True}, "echo", "unsupported_parameter"),
    (COMPLETIONS, {"suffix": "end"}, "suffix", "unsupported_parameter"),
    (COMPLETIONS, {"n": 3}, "n", "unsupported_parameter"),
    (COMPLETIONS, {"messages": HELLO}, "messages", "unknown_parameter"),
    (COMPLETIONS, {"top_logprobs": 2}, "top_logprobs", "unknown_parameter"),
]


@pytest.mark.parametrize(
    "path, change, param, code", INVALID, ids=[f"{p[4:8]}-{c}" for p, c, _, _ in INVALID]
)
def test_a_bad_request_is_a_400_naming_the_parameter(path, change, param, code):
    app, cascade = make_app()
    body = (CHAT_BODY if path == CHAT else COMPLETION_BODY) | change
    response = post(app, path, body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(param)  # the message names it too
    if code is not None:
        assert error["code"] == code
    assert cascade.requests == []  # refused before any model work


def test_a_bad_header_is_a_400_naming_it():
    app, cascade = make_app()
    response = post(app, CHAT, CHAT_BODY, headers={"x-protege-timeout-ms": "0"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "header.x-protege-timeout-ms"
    assert cascade.requests == []


def test_a_missing_field_is_named():
    app, _ = make_app()
    for body, param in (({"messages": HELLO}, "model"), ({"model": "headlines"}, "messages")):
        error = error_of(post(app, CHAT, body))
        assert error["param"] == param and error["code"] == "missing_required_parameter"


def test_unknown_fields_are_named_together_with_the_fields_taken():
    app, _ = make_app()
    error = error_of(post(app, CHAT, CHAT_BODY | {"foo": 1, "bar": 2}))
    assert error["param"] == "foo" and error["code"] == "unknown_parameter"
    assert "foo, bar" in error["message"] and "max_completion_tokens" in error["message"]


def test_neutral_values_of_unimplemented_parameters_are_accepted():
    app, cascade = make_app()
    neutral = {
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "tools": None,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "store": False,
        "user": "u-1",
    }
    assert post(app, CHAT, CHAT_BODY | neutral).status_code == 200
    completion_neutral = {"n": 1, "best_of": 1, "echo": False, "suffix": None, "logit_bias": None}
    assert post(app, COMPLETIONS, COMPLETION_BODY | completion_neutral).status_code == 200
    assert len(cascade.requests) == 2
    # JSON's types count: true is not 1
    assert error_of(post(app, CHAT, CHAT_BODY | {"n": True}))["param"] == "n"


def test_a_body_that_is_not_a_json_object_is_a_400():
    app, _ = make_app()
    client = TestClient(app)
    headers = {"Authorization": f"Bearer {PLAIN}", "content-type": "application/json"}
    response = client.post(CHAT, content=b'{"model": ', headers=headers)
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"
    response = client.post(CHAT, content=b"[1, 2]", headers=headers)
    assert response.status_code == 400 and error_of(response)["param"] is None


def test_a_prompt_over_the_limit_is_context_length_exceeded_never_cut():
    app, cascade = make_app()
    long = " ".join(["word"] * (MAX_PROMPT + 1))
    response = post(app, COMPLETIONS, {"model": "headlines", "prompt": long})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"{MAX_PROMPT + 1} tokens" in error["message"]
    response = post(
        app, CHAT, {"model": "headlines", "messages": [{"role": "user", "content": long}]}
    )
    assert error_of(response)["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(app).completions.create(model="headlines", prompt=long)
    assert caught.value.code == "context_length_exceeded"
    assert cascade.requests == []


def test_a_prompt_over_a_newly_swapped_limit_is_refused_by_the_service_too():
    def shrunk(request):
        raise PromptTooLong(len(request.prompt_ids), 1)
        yield  # pragma: no cover

    app, _ = make_app(shrunk)
    response = post(app, COMPLETIONS, {"model": "headlines", "prompt": "two words"})
    assert response.status_code == 400
    assert error_of(response)["code"] == "context_length_exceeded"


def test_a_model_that_is_not_a_hosted_generative_cascade_is_a_404_naming_them():
    app, _ = make_app()
    for name in ("gpt-4o", "topics"):  # unknown; a classification cascade
        response = post(app, CHAT, {"model": name, "messages": HELLO})
        assert response.status_code == 404
        error = error_of(response)
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "headlines (generate)" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client_for(app).completions.create(model="gpt-4o", prompt="x")


# --- overrides and the guard -------------------------------------------------------------


def test_routing_overrides_need_a_key_allowed_them():
    app, cascade = make_app(escalated)
    extra = {"protege": {"force_tier": "teacher", "threshold": 0.9}}
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client_for(app, PLAIN).chat.completions.create(
            model="headlines", messages=HELLO, extra_body=extra
        )
    assert caught.value.body["param"] == "protege" and "force_tier" in caught.value.message
    assert cascade.requests == []
    client_for(app, STEER).chat.completions.create(
        model="headlines", messages=HELLO, extra_body=extra
    )
    assert cascade.requests[0].force_tier == "teacher"
    assert cascade.requests[0].threshold == 0.9


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_the_guards_refusals_are_in_openai_shape(path):
    app, _ = make_app()
    body = CHAT_BODY if path == CHAT else COMPLETION_BODY
    response = post(app, path, body, key=None)
    assert response.status_code == 401
    assert error_of(response)["type"] == "authentication_error"
    response = post(app, path, body, key="pk_not-a-key")
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    response = post(app, path, body | {"user": "x" * 5000})
    assert response.status_code == 413 and error_of(response)["type"] == "invalid_request_error"
    response = TestClient(app).get(path, headers={"Authorization": f"Bearer {PLAIN}"})
    assert response.status_code == 405 and error_of(response)["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        client_for(app, "pk_wrong").chat.completions.create(model="headlines", messages=HELLO)


def test_the_classify_route_keeps_protege_s_own_error_shape():
    app, _ = make_app()
    response = TestClient(app).post("/v1/classify", json={"inputs": ["x"]})
    assert response.status_code == 401
    assert isinstance(response.json()["error"], str)


def test_the_openapi_document_states_the_routes_and_their_errors():
    app, _ = make_app()
    document = TestClient(app).get("/openapi.json").json()
    for path in (CHAT, COMPLETIONS):
        post_op = document["paths"][path]["post"]
        assert {"200", "400", "401", "403", "404", "413"} <= set(post_op["responses"])
        assert "text/event-stream" in post_op["responses"]["200"]["content"]
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["additionalProperties"] is False
    assert chat["properties"]["temperature"]["anyOf"][0]["maximum"] == 2


def test_top_logprobs_without_logprobs_is_ignored_as_its_schema_says():
    """The schema lets top_logprobs stand alone (a JSON schema cannot tie it to logprobs:
    true), so the route accepts it and returns no log-probabilities, as it says."""
    from serving.generate.openai_schemas import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    )
    assert request.top_logprobs_k is None


def test_cross_field_choices_a_json_schema_cannot_state_are_accepted_and_resolved():
    """The schema describes what is accepted (schemathesis checks it): both token budgets are
    taken, the smaller wins; stream_options without stream changes nothing."""
    from serving.generate.openai_schemas import ChatCompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    both = ChatCompletionRequest.model_validate(
        {**chat, "max_tokens": 3, "max_completion_tokens": 4}
    )
    assert both.new_tokens == 3
    plain = ChatCompletionRequest.model_validate(
        {**chat, "stream": False, "stream_options": {"include_usage": True}}
    )
    assert plain.stream is False


def test_an_integral_float_is_the_integer_json_schema_says_it_is():
    from pydantic import ValidationError

    from serving.generate.openai_schemas import ChatCompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionRequest.model_validate({**chat, "max_tokens": 12.0}).max_tokens == 12
    for bad in (12.5, True, "12"):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**chat, "max_tokens": bad})
