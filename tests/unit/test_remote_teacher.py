"""The remote teacher's side of the OpenAI protocol: what it asks, how it reads a stream,
how it names tokens, how it fails. The server here is a stand-in (``httpx.MockTransport``)
speaking the wire format; tests/integration/test_remote_teacher_served.py asks protege's own
teacher served alone on its OpenAI routes."""

from __future__ import annotations

import asyncio
import json
import socket
from collections import Counter

import httpx
import pytest
from generate_support import Sink, config, student_of
from tiny_lm import build_tiny_lm, build_tokenizer

from serving.generate.config import LanguageModelSpec, RemoteTeacherSpec
from serving.generate.events import Finished, GenerationRequest, Routed
from serving.generate.generation import SamplingSettings
from serving.generate.models import load_language_model, render_chat
from serving.generate.remote_teacher import (
    UNKNOWN_ID,
    RemoteTeacher,
    RemoteTeacherError,
    TokenIds,
    api_key,
)
from serving.generate.service import GenerationService
from serving.generate.teacher_engine import TeacherChunk, TeacherDone, TeacherRequest

URL, MODEL = "http://teacher.test/v1", "big-model"
CHAT = [{"role": "user", "content": "hello"}]


def sse(*events: object) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events]
    return ("".join(lines) + "data: [DONE]\n\n").encode()


def chat_chunk(text: str, token_top: list[tuple[str, float]] | None, finish=None) -> dict:
    choice: dict = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    if token_top is not None:
        (token, logprob), alternatives = token_top[0], token_top
        choice["logprobs"] = {
            "content": [
                {
                    "token": token,
                    "logprob": logprob,
                    "bytes": list(token.encode()),
                    "top_logprobs": [
                        {"token": t, "logprob": lp, "bytes": list(t.encode())}
                        for t, lp in alternatives
                    ],
                }
            ]
        }
    return {"object": "chat.completion.chunk", "choices": [choice]}


class Server:
    """Answers ``GET /models`` and one POST with ``body``; remembers what it was asked."""

    def __init__(self, body: bytes = b"", status: int = 200, models=(MODEL,)) -> None:
        self.body, self.status, self.models = body, status, list(models)
        self.asked: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(request)
        if request.method == "GET":
            return httpx.Response(200, json={"data": [{"id": m} for m in self.models]})
        kind = "text/event-stream" if self.status == 200 else "application/json"
        return httpx.Response(self.status, content=self.body, headers={"content-type": kind})


def teacher(server: Server, key: str | None = None, tokenizer=None) -> RemoteTeacher:
    remote = RemoteTeacher(URL, MODEL, key, transport=httpx.MockTransport(server))
    if tokenizer is not None:
        remote._token_ids = TokenIds(tokenizer)
    return remote


async def items(remote: RemoteTeacher, request: TeacherRequest) -> list:
    return [item async for item in remote.stream(request)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def texts(tokenizer) -> list[str]:
    return [
        tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in range(len(tokenizer))
    ]


@pytest.fixture(scope="module")
def words(tokenizer) -> tuple[tuple[str, int], tuple[str, int]]:
    """Two tokens whose texts are words (as a server would name them)."""
    found = [(text, i) for i, text in enumerate(texts(tokenizer)) if text.strip().isalpha()]
    return found[-1], found[-2]


def test_token_ids_name_each_text_that_one_token_has(tokenizer):
    ids, all_texts = TokenIds(tokenizer), texts(tokenizer)
    counts = Counter(all_texts)
    assert 1 < counts["\ufffd"] < len(all_texts)  # byte tokens of partial UTF-8 share it
    for token, text in enumerate(all_texts):
        assert ids(text) == (UNKNOWN_ID if counts[text] > 1 else token)
    assert ids("\ufffd") == UNKNOWN_ID  # partial UTF-8 bytes all show as the replacement
    assert ids("no such token text") == UNKNOWN_ID


def test_a_chat_asks_for_logprobs_and_streams_named_tokens(tokenizer, words):
    (first, the), (second, cat) = words
    server = Server(
        sse(
            chat_chunk(first, [(first, -0.1), (second, -2.5)]),
            chat_chunk(second, [(second, -0.2), (first, -1.9)], finish="length"),
            {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 2}},
        )
    )
    request = TeacherRequest(
        settings=SamplingSettings(2, stop=["\n"], seed=3), messages=CHAT, top_k=2, text_top_k=1
    )
    got = asyncio.run(items(teacher(server, "sk-secret", tokenizer), request))
    asked = server.asked[-1]
    body = json.loads(asked.content)
    assert asked.url.path == "/v1/chat/completions"
    assert asked.headers["authorization"] == "Bearer sk-secret"
    assert body["model"] == MODEL and body["messages"] == CHAT
    assert body["logprobs"] is True and body["top_logprobs"] == 2
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["stop"], body["seed"]) == (
        2,
        0.0,
        ["\n"],
        3,
    )
    chunks, done = got[:-1], got[-1]
    assert [c.text for c in chunks] == [first, second]
    assert [c.token_ids for c in chunks] == [[the], [cat]]
    assert chunks[0].top_logprobs == [[(the, -0.1), (cat, -2.5)]]
    assert chunks[0].tokens == [first] and chunks[0].top_tokens == [[first, second]]
    assert isinstance(done, TeacherDone)
    assert (done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("length", 11, 2)
    assert done.version == MODEL and done.accepted is None  # no draft: generated from scratch


def test_a_completion_caps_its_top_k_at_five_and_ranks_the_alternatives(tokenizer, words):
    (first, the), (second, cat) = words
    choice = {
        "index": 0,
        "text": first,
        "finish_reason": "stop",
        "logprobs": {
            "tokens": [first],
            "token_logprobs": [-0.3],
            "top_logprobs": [{second: -2.0, first: -0.3}],
            "text_offset": [0],
        },
    }
    server = Server(sse({"object": "text_completion", "choices": [choice]}))
    request = TeacherRequest(settings=SamplingSettings(4), prompt="say", top_k=8)
    got = asyncio.run(items(teacher(server, tokenizer=tokenizer), request))
    body = json.loads(server.asked[-1].content)
    assert server.asked[-1].url.path == "/v1/completions"
    assert body["prompt"] == "say" and body["logprobs"] == 5
    assert "authorization" not in server.asked[-1].headers
    chunk = got[0]
    assert isinstance(chunk, TeacherChunk)
    assert chunk.top_logprobs == [[(the, -0.3), (cat, -2.0)]]
    assert chunk.tokens is None  # the client asked for no token texts
    assert got[-1].completion_tokens == 1  # counted from the tokens: no usage chunk


def test_without_a_tokenizer_tokens_are_unnamed(tokenizer):
    server = Server(sse(chat_chunk("the", [("the", -0.1)], finish="stop")))
    request = TeacherRequest(settings=SamplingSettings(2), messages=CHAT, top_k=1)
    chunk = asyncio.run(items(teacher(server), request))[0]
    assert chunk.token_ids == [UNKNOWN_ID] and chunk.top_logprobs == [[(UNKNOWN_ID, -0.1)]]


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        (401, {"error": {"message": "Incorrect API key", "type": "x"}}, "401: Incorrect API key"),
        (503, "overloaded", "503: overloaded"),
    ],
)
def test_a_refusal_raises_with_the_servers_message(status, body, says):
    content = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
    request = TeacherRequest(settings=SamplingSettings(2), messages=CHAT)
    with pytest.raises(RemoteTeacherError, match=says):
        asyncio.run(items(teacher(Server(content, status)), request))


def test_an_error_event_mid_answer_raises_after_the_first_chunk():
    server = Server(sse(chat_chunk("the", None), {"error": {"message": "engine died"}}))
    request = TeacherRequest(settings=SamplingSettings(2), messages=CHAT)

    async def run() -> list:
        got = []
        with pytest.raises(RemoteTeacherError, match="engine died"):
            async for item in teacher(server).stream(request):
                got.append(item)
        return got

    assert [c.text for c in asyncio.run(run())] == ["the"]


def test_a_stream_without_its_end_is_a_failure():
    server = Server(sse(chat_chunk("the", None)))  # [DONE] without a finish reason
    request = TeacherRequest(settings=SamplingSettings(2), messages=CHAT)
    with pytest.raises(RemoteTeacherError, match="without a finish reason"):
        asyncio.run(items(teacher(server), request))


def test_info_names_the_model_and_refuses_one_the_server_does_not_list():
    server = Server(models=["other"])
    with pytest.raises(RemoteTeacherError, match=r"does not serve model 'big-model'.*other"):
        asyncio.run(teacher(server).info())
    server = Server()
    remote = teacher(server)
    info = asyncio.run(remote.info())
    assert (info.version, info.tokenizer_digest, info.verifies_drafts) == (MODEL, None, False)
    asyncio.run(remote.info())
    assert len(server.asked) == 1  # asked once, then kept


def test_a_named_key_variable_must_be_set(monkeypatch):
    monkeypatch.delenv("PROTEGE_TEACHER_KEY", raising=False)
    with pytest.raises(ValueError, match="PROTEGE_TEACHER_KEY is unset or empty"):
        api_key("PROTEGE_TEACHER_KEY")
    monkeypatch.setenv("PROTEGE_TEACHER_KEY", "")
    with pytest.raises(ValueError, match="unset or empty"):
        api_key("PROTEGE_TEACHER_KEY")
    monkeypatch.setenv("PROTEGE_TEACHER_KEY", "sk-1")
    assert api_key("PROTEGE_TEACHER_KEY") == "sk-1"
    assert api_key(None) is None


def test_the_config_takes_a_folder_or_a_server(tmp_path):
    local = config(tmp_path)
    assert isinstance(local.teacher, LanguageModelSpec)
    remote = config(tmp_path, teacher={"url": "http://127.0.0.1:8000/v1", "model": "m"})
    assert isinstance(remote.teacher, RemoteTeacherSpec)
    assert remote.teacher.api_key_env is None and remote.teacher.tokenizer is None
    for bad in (
        {"url": "127.0.0.1:8000/v1", "model": "m"},  # no scheme
        {"url": "http://h/v1"},  # no model
        {"url": "http://h/v1", "model": "m", "key": "sk-in-the-file"},  # keys live in the env
    ):
        with pytest.raises(ValueError):
            config(tmp_path, teacher=bad)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_teacher_leaves_the_students_answer_degraded_and_logged(tmp_path):
    folder = build_tiny_lm(tmp_path / "student", seed=2)
    lm = load_language_model(folder, device="cpu")
    sink = Sink()
    remote = RemoteTeacher(f"http://127.0.0.1:{closed_port()}/v1", MODEL)
    service = GenerationService(
        config(tmp_path, threshold=1.0, teacher={"url": URL, "model": MODEL}),
        lambda: student_of(lm, digest="student", threshold=1.0),
        remote,
        sink,
    )

    async def run() -> list:
        ids = render_chat(lm.tokenizer, CHAT)
        request = GenerationRequest(
            request_id="r1", prompt_ids=ids, messages=CHAT, settings=SamplingSettings(4)
        )
        return [event async for event in service.stream(request)]

    events = asyncio.run(run())
    routed = next(e for e in events if isinstance(e, Routed))
    assert routed.tier == "student" and routed.escalated and routed.degraded
    assert isinstance(events[-1], Finished)
    (record,) = sink.records
    assert record.teacher_status == "failed" and record.teacher_text is None


def test_alternatives_out_of_order_are_ranked(tokenizer, words):
    (first, the), (second, cat) = words
    server = Server(sse(chat_chunk(first, [(second, -2.0), (first, -0.1)], finish="stop")))
    request = TeacherRequest(settings=SamplingSettings(2), messages=CHAT, top_k=2)
    chunk = asyncio.run(items(teacher(server, tokenizer=tokenizer), request))[0]
    # the chosen token is the first listed in the stub's content; the ranking is by logprob
    assert chunk.top_logprobs == [[(the, -0.1), (cat, -2.0)]]


class Body(httpx.AsyncByteStream):
    """An endless event stream that remembers being closed."""

    def __init__(self) -> None:
        self.closed = False

    async def __aiter__(self):
        while True:
            yield f"data: {json.dumps(chat_chunk('x', None))}\n\n".encode()
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        self.closed = True


def test_closing_the_stream_mid_answer_closes_the_http_response():
    body = Body()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=body, headers={"content-type": "text/event-stream"})

    remote = RemoteTeacher(URL, MODEL, transport=httpx.MockTransport(handler))
    request = TeacherRequest(settings=SamplingSettings(2), messages=CHAT)

    async def run() -> None:
        stream = remote.stream(request)
        assert (await anext(stream)).text == "x"
        await stream.aclose()  # the client went away: the server must see it

    asyncio.run(run())
    assert body.closed


def test_a_key_never_travels_in_clear_text(tmp_path):
    def spec(url: str, **fields):
        return config(tmp_path, teacher={"url": url, "model": "m", "api_key_env": "K", **fields})

    with pytest.raises(ValueError, match=r"in clear text to teacher\.example"):
        spec("http://teacher.example/v1")
    assert spec("https://teacher.example/v1").teacher.api_key_env == "K"
    assert spec("http://127.0.0.1:8000/v1").teacher.url.startswith("http://127")  # this machine
    assert spec("http://teacher.example/v1", allow_plain_http=True).teacher.allow_plain_http
    unkeyed = config(tmp_path, teacher={"url": "http://teacher.example/v1", "model": "m"})
    assert unkeyed.teacher.api_key_env is None  # no key, nothing to leak


def test_the_gateway_refuses_a_named_key_that_is_not_set(tmp_path, monkeypatch):
    from serving.app import ConfigError, check_remote_teacher
    from serving.generate.host import teacher_client

    monkeypatch.delenv("PROTEGE_NO_SUCH_KEY", raising=False)
    cascade = config(
        tmp_path,
        teacher={"url": "https://t.example/v1", "model": "m", "api_key_env": "PROTEGE_NO_SUCH_KEY"},
    )
    with pytest.raises(ConfigError, match="PROTEGE_NO_SUCH_KEY is unset or empty"):
        check_remote_teacher(cascade.teacher)
    with pytest.raises(ValueError, match="unset or empty"):
        teacher_client(cascade, None)  # a replica fails closed too
    monkeypatch.setenv("PROTEGE_NO_SUCH_KEY", "sk-1")
    assert isinstance(teacher_client(cascade, None), RemoteTeacher)
    with pytest.raises(ValueError, match="needs its teacher deployment"):
        teacher_client(config(tmp_path), None)


class Scripted:
    """A teacher client answering with fixed chunks (what a remote server's texts named)."""

    def __init__(self, chunks: list[TeacherChunk]) -> None:
        self.chunks = chunks

    async def info(self):
        from serving.generate.teacher_engine import TeacherInfo

        return TeacherInfo("remote-model", None, verifies_drafts=False)

    async def stream(self, request):
        for chunk in self.chunks:
            yield chunk
        yield TeacherDone("stop", 3, len(self.chunks), "remote-model")


@pytest.fixture(scope="module")
def student_lm(tmp_path_factory):
    return load_language_model(build_tiny_lm(tmp_path_factory.mktemp("s") / "lm", seed=2), "cpu")


def logged(tmp_path, lm, chunks: list[TeacherChunk]):
    sink = Sink()
    service = GenerationService(
        config(tmp_path, threshold=1.0, top_logprobs=3, teacher={"url": URL, "model": MODEL}),
        lambda: student_of(lm, digest="student", threshold=1.0),
        Scripted(chunks),
        sink,
    )

    async def run() -> list:
        ids = render_chat(lm.tokenizer, CHAT)
        request = GenerationRequest(
            request_id="r", prompt_ids=ids, messages=CHAT, settings=SamplingSettings(4)
        )
        return [event async for event in service.stream(request)]

    asyncio.run(run())
    (record,) = sink.records
    return record


def chunk(token: int, top: list[tuple[int, float]]) -> TeacherChunk:
    return TeacherChunk(text="t", token_ids=[token], logprobs=[top[0][1]], top_logprobs=[top])


def test_the_log_keeps_the_alternatives_every_position_names(tmp_path, student_lm):
    named = [
        chunk(5, [(5, -0.1), (7, -1.0), (8, -2.0)]),
        chunk(6, [(6, -0.2), (9, -1.5), (3, -2.5)]),
    ]
    record = logged(tmp_path, student_lm, named)
    assert record.teacher_top_logprobs.ids == [[5, 7, 8], [6, 9, 3]]
    cut = [
        chunk(5, [(5, -0.1), (-1, -1.0), (8, -2.0)]),
        chunk(6, [(6, -0.2), (9, -1.5), (3, -2.5)]),
    ]
    record = logged(tmp_path, student_lm, cut)  # an unnamed second choice: k cut to 1 everywhere
    assert record.teacher_top_logprobs.ids == [[5], [6]]
    twice = [chunk(5, [(5, -0.1), (5, -1.0), (8, -2.0)])]
    assert logged(tmp_path, student_lm, twice).teacher_top_logprobs.ids == [[5]]
    unnamed = [chunk(-1, [(-1, -0.1), (7, -1.0), (8, -2.0)])]
    record = logged(tmp_path, student_lm, unnamed)  # the answer's own token has no id
    assert record.teacher_top_logprobs is None and record.teacher_text == "t"


def test_a_top_k_the_record_refuses_never_loses_the_record(tmp_path, student_lm):
    unsorted = [chunk(5, [(5, -2.0), (7, -0.1), (8, -3.0)])]  # not most likely first
    record = logged(tmp_path, student_lm, unsorted)
    assert record.teacher_status == "answered" and record.teacher_text == "t"
    assert record.teacher_top_logprobs is None
