"""A generative cascade whose teacher is an OpenAI-compatible server: protege's own teacher
served alone (the teacher's folder in the student's place, never escalating) on its OpenAI
routes, behind a key, and a cascade in front of it that escalates every answer. On a real
local Ray Serve, asked with the official ``openai`` client: the answers are the teacher's
greedy ones, generated from scratch (no draft), the metadata names the remote model, and
the log keeps the teacher's text and top-k with the ids of the teacher's tokenizer."""

import openai
import pytest
from conftest import wait_for
from ray import serve
from tiny_lm import build_tiny_lm

from serving import local_ray
from serving.access import new_key, write_entry
from serving.contracts.records import iter_records
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat, render_completion
from serving.generate.remote_teacher import MAX_COMPLETION_LOGPROBS, TokenIds

pytestmark = pytest.mark.integration
ALONE, CASCADE = "teacher-alone", "remote-cascade"
TEACHER_MODEL, CASCADE_MODEL = "teacher:tiny", "cascade:tiny"
MAX_NEW, MAX_PROMPT, TOP_K = 8, 48, 6
COMPLETION_TOKENS = 4  # the tiny teacher's first 4 tokens here are whole words, named by text
CHAT = [{"role": "user", "content": "The cat sat on the mat."}]
PROMPT = "Markets rose today"
KEY_VARIABLE = "PROTEGE_TEST_TEACHER_KEY"
TEACHER_KEY, TEACHER_KEY_ENTRY = new_key("cascade-to-teacher")
CLIENT_KEY, CLIENT_KEY_ENTRY = new_key("client")


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return build_tiny_lm(root / "student", seed=2), build_tiny_lm(root / "teacher", seed=1)


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("alone-log"), tmp_path_factory.mktemp("cascade-log")


def generate(folder, log, teacher, **fields) -> dict:
    return {
        "student": {"path": str(folder)},
        "teacher": teacher,
        "max_prompt_tokens": MAX_PROMPT,
        "max_new_tokens": MAX_NEW,
        "top_logprobs": TOP_K,
        "log": {"dir": str(log), "fsync_interval_s": 0.2},
        **fields,
    }


@pytest.fixture(scope="module")
def url(lms, logs, serve_cluster, tmp_path_factory):
    student, teacher = lms
    keys = tmp_path_factory.mktemp("keys") / "api-keys.yaml"
    write_entry(keys, TEACHER_KEY_ENTRY)
    write_entry(keys, CLIENT_KEY_ENTRY)
    base = f"http://127.0.0.1:{serve_cluster}"
    alone = generate(
        teacher, logs[0], {"path": str(teacher)}, name=TEACHER_MODEL, threshold=0.0
    ) | {"audit_fraction": 0.0}
    remote = {
        "url": f"{base}/{ALONE}/v1",
        "model": TEACHER_MODEL,
        "api_key_env": KEY_VARIABLE,
        "tokenizer": str(teacher),
    }
    cascade = generate(student, logs[1], remote, name=CASCADE_MODEL, threshold=1.0) | {
        "audit_fraction": 0.0
    }
    apps = []
    for name, section, runtime_env in (
        (ALONE, alone, {}),
        (CASCADE, cascade, {"env_vars": {KEY_VARIABLE: TEACHER_KEY}}),  # the key: in the env
    ):
        args = {"generate": section, "torch_threads": 1, "access": {"keys_file": str(keys)}}
        apps.append(
            {
                "name": name,
                "route_prefix": f"/{name}",
                "import_path": "serving.app:build_app",
                "args": args,
                "runtime_env": runtime_env,
            }
        )
    local_ray.deploy_config({"applications": apps}, tmp_path_factory.mktemp("base"))
    yield f"{base}/{CASCADE}"
    for name in (CASCADE, ALONE):
        serve.delete(name)


@pytest.fixture(scope="module")
def teacher_greedy(lms):
    """The teacher's greedy answers in process, with their top-k."""
    lm = load_language_model(lms[1], device="cpu")
    chat = render_chat(lm.tokenizer, CHAT)
    completion = render_completion(lm.tokenizer, PROMPT)
    settings = SamplingSettings(MAX_NEW)
    (chat_answer,) = generate_batch(lm, [chat], settings, top_k=TOP_K)
    short = SamplingSettings(COMPLETION_TOKENS)
    (completion_answer,) = generate_batch(lm, [completion], short, top_k=TOP_K)
    return {"chat": chat_answer, "completion": completion_answer, "ids": TokenIds(lm.tokenizer)}


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def answers(url):
    chat = client(url).chat.completions.with_raw_response.create(model=CASCADE_MODEL, messages=CHAT)
    stream = client(url).completions.create(
        model=CASCADE_MODEL,
        prompt=PROMPT,
        max_tokens=COMPLETION_TOKENS,
        stream=True,
        logprobs=2,
        stream_options={"include_usage": True},
    )
    return chat, list(stream)


def test_the_cascade_is_ready_behind_the_remote_teacher(url):
    (entry,) = client(url).models.list()
    assert entry.id == CASCADE_MODEL
    assert entry.protege["teacher"]["version"] == TEACHER_MODEL


def test_a_chat_escalated_to_the_remote_teacher_is_its_greedy_answer(answers, teacher_greedy):
    raw, _ = answers
    chat = raw.parse()
    assert raw.headers["x-protege-tier"] == "teacher"
    assert chat.choices[0].message.content == teacher_greedy["chat"].text
    info = chat.protege
    assert info["tier"] == "teacher" and info["escalated"] and not info["degraded"]
    assert info["draft"] == "teacher"  # an API verifies no draft: generated from scratch
    assert info["teacher_version"] == TEACHER_MODEL
    assert chat.usage.completion_tokens == teacher_greedy["chat"].completion_tokens


def test_a_streamed_completion_carries_the_remote_tokens(answers, teacher_greedy):
    _, pieces = answers
    assert pieces[0].protege["tier"] == "teacher"
    text = "".join(p.choices[0].text for p in pieces if p.choices)
    assert text == teacher_greedy["completion"].text
    tokens = [
        t
        for p in pieces
        if p.choices and p.choices[0].logprobs
        for t in p.choices[0].logprobs.token_logprobs
    ]
    assert tokens == pytest.approx(teacher_greedy["completion"].logprobs, abs=1e-4)
    assert pieces[-1].usage.completion_tokens == len(tokens)


def test_the_log_keeps_the_teachers_text_and_top_k(answers, logs, teacher_greedy, lms):
    raw, pieces = answers
    ids = {raw.parse().protege["request_id"]: "chat", pieces[0].protege["request_id"]: "completion"}

    def records():
        return [r for r in iter_records(logs[1], with_top_k=True) if r.kind == "generate"]

    wait_for(lambda: len(records()) >= len(ids), timeout_s=30)
    logged = {ids[r.request_id]: r for r in records()}
    assert set(logged) == {"chat", "completion"}
    tokenizer = load_language_model(lms[1], device="cpu").tokenizer

    def decode(token: int) -> str:
        return str(tokenizer.decode([token], clean_up_tokenization_spaces=False))

    name, with_top_k = teacher_greedy["ids"], 0
    for kind, k in (("chat", TOP_K), ("completion", MAX_COMPLETION_LOGPROBS)):
        record, answer = logged[kind], teacher_greedy[kind]
        assert record.teacher_status == "answered" and record.reason == "low_confidence"
        assert record.teacher_text == answer.text and record.teacher_version == TEACHER_MODEL
        assert record.draft_tokens is None  # no draft was checked
        named = [  # how many leading alternatives the API's texts name, per position
            next(
                (j for j, (i, _) in enumerate(position[:k]) if name(decode(i)) != i),
                min(k, len(position)),
            )
            for position in answer.top_logprobs
        ]
        kept = min(named)
        if all(name(decode(i)) == i for i in answer.token_ids) and kept:
            top = record.teacher_top_logprobs
            assert top is not None and top.tokens == answer.token_ids
            assert top.ids == [[i for i, _ in position[:kept]] for position in answer.top_logprobs]
            with_top_k += 1
        else:  # an answer token no text names (partial UTF-8): no top-k rather than a wrong one
            assert record.teacher_top_logprobs is None
    assert with_top_k >= 1  # these prompts' answers name their tokens: the path is taken
    assert not [r for r in iter_records(logs[0]) if r.kind == "generate"]  # alone: no log
