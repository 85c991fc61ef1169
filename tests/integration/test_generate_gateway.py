"""One gateway hosting both kinds on a real local Ray Serve, asked with the official
``openai`` client on one base URL: the list of models, chat and completion (plain and
streaming) with protege's metadata, a forced escalation answered by the teacher from the
student's draft, the refusals in OpenAI's shape, one record per escalated request in the
generative cascade's own log, and /v1/classify beside it."""

import httpx
import openai
import pytest
from conftest import tiny_config, wait_for
from tiny_lm import build_tiny_lm

from serving.access import new_key, write_entry
from serving.contracts.records import iter_records
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat, render_completion

pytestmark = pytest.mark.integration
APP = "both-kinds"
CLASSIFY, GENERATE = "topics:tiny", "chat:tiny"
MAX_NEW, MAX_PROMPT = 8, 48
CHAT = [{"role": "user", "content": "The cat sat on the mat."}]
PROMPT = "Markets rose today"
PLAIN, PLAIN_ENTRY = new_key("plain")
STEER, STEER_ENTRY = new_key("steer", overrides=True)


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return build_tiny_lm(root / "student", seed=2), build_tiny_lm(root / "teacher", seed=1)


@pytest.fixture(scope="module")
def gen_log(tmp_path_factory):
    return tmp_path_factory.mktemp("generations")


@pytest.fixture(scope="module")
def url(deploy, tiny_pair, lms, gen_log, tmp_path_factory, serve_cluster) -> str:
    keys = tmp_path_factory.mktemp("keys") / "api-keys.yaml"
    write_entry(keys, PLAIN_ENTRY)
    write_entry(keys, STEER_ENTRY)
    generate = {
        "name": GENERATE,
        "student": {"path": str(lms[0])},
        "teacher": {"path": str(lms[1])},
        "threshold": 0.0,  # every answer kept unless steered: the records are countable
        "audit_fraction": 0.0,
        "max_prompt_tokens": MAX_PROMPT,
        "max_new_tokens": MAX_NEW,
        "log": {"dir": str(gen_log), "fsync_interval_s": 0.2},
    }
    config = tiny_config(
        tiny_pair,
        tmp_path_factory.mktemp("escalations"),
        cascade={"name": CLASSIFY, "threshold": 0.5},
        access={"keys_file": str(keys)},
        generate=generate,
    )
    deploy(APP, config)
    return f"http://127.0.0.1:{serve_cluster}/{APP}"


@pytest.fixture(scope="module")
def greedy(lms):
    """The greedy answers of the student and the teacher in process (float64: padded and
    incremental decoding agree), for the chat and the completion prompt."""
    answers = {}
    for role, folder in zip(("student", "teacher"), lms, strict=True):
        lm = load_language_model(folder, device="cpu")
        for kind, ids in (
            ("chat", render_chat(lm.tokenizer, CHAT)),
            ("completion", render_completion(lm.tokenizer, PROMPT)),
        ):
            answers[role, kind] = generate_batch(lm, [ids], SamplingSettings(MAX_NEW))[0]
    return answers


def client(url: str, key: str = PLAIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_the_list_of_models_shows_both_cascades(url):
    models = {m.id: m for m in client(url).models.list()}
    assert set(models) == {CLASSIFY, GENERATE}
    info = models[GENERATE].protege
    assert info["kind"] == "generate" and models[CLASSIFY].protege["kind"] == "classify"
    assert (info["max_prompt_tokens"], info["max_new_tokens"]) == (MAX_PROMPT, MAX_NEW)
    assert info["threshold"] == 0.0 and info["agreement_cut"] == 0.5
    assert info["student"]["version"] != info["teacher"]["version"]
    assert info["swap"]["following"] == "its generate.student.path"


def test_chat_and_completion_are_the_student_s_answers_with_metadata(url, greedy):
    raw = client(url).chat.completions.with_raw_response.create(model=GENERATE, messages=CHAT)
    chat = raw.parse()
    assert raw.headers["x-protege-tier"] == "student"
    assert chat.choices[0].message.content == greedy["student", "chat"].text
    assert chat.model == GENERATE and chat.protege["tier"] == "student"
    assert not chat.protege["escalated"] and chat.protege["logged"] is None
    assert chat.usage.completion_tokens == greedy["student", "chat"].completion_tokens

    completion = client(url).completions.create(model=GENERATE, prompt=PROMPT, max_tokens=50)
    assert completion.choices[0].text == greedy["student", "completion"].text
    assert completion.protege["max_tokens"] == MAX_NEW  # clamped to the version's limit
    assert completion.protege["max_tokens_clamped"] is True


def test_streams_carry_the_same_answer_usage_and_metadata(url, greedy):
    raw = client(url).chat.completions.with_raw_response.create(
        model=GENERATE, messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-protege-tier"] == "student"
    chunks = list(raw.parse())
    assert chunks[0].protege["tier"] == "student"  # known before the first byte
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy["student", "chat"].text
    assert chunks[-1].usage.completion_tokens == greedy["student", "chat"].completion_tokens

    stream = client(url).completions.create(
        model=GENERATE, prompt=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    pieces = list(stream)
    assert "".join(p.choices[0].text for p in pieces if p.choices) == (
        greedy["student", "completion"].text
    )
    assert pieces[-1].usage.total_tokens > 0


@pytest.fixture(scope="module")
def escalated(url):
    """Two answers steered to the teacher with the steering key: a chat forced to the
    teacher, and a streamed completion under a threshold above every confidence (also
    logged as forced: the client chose the routing)."""
    raw = client(url, STEER).chat.completions.with_raw_response.create(
        model=GENERATE, messages=CHAT, extra_body={"protege": {"force_tier": "teacher"}}
    )
    stream = client(url, STEER).completions.create(
        model=GENERATE, prompt=PROMPT, stream=True, extra_body={"protege": {"threshold": 1.0}}
    )
    return raw, list(stream)


def test_a_forced_escalation_is_the_teacher_s_answer_from_the_draft(escalated, greedy):
    assert greedy["teacher", "chat"].text != greedy["student", "chat"].text  # tells them apart
    raw, pieces = escalated
    chat = raw.parse()
    assert raw.headers["x-protege-tier"] == "teacher"
    assert chat.choices[0].message.content == greedy["teacher", "chat"].text
    meta = chat.protege
    assert (meta["tier"], meta["escalated"], meta["reason"]) == ("teacher", True, "forced")
    assert meta["draft"] == "verified" and meta["logged"] is True
    assert meta["draft_tokens"] == greedy["student", "chat"].completion_tokens
    assert 0 <= meta["draft_accepted"] <= meta["draft_tokens"]
    details = chat.usage.completion_tokens_details
    assert details.accepted_prediction_tokens == meta["draft_accepted"]
    assert pieces[0].protege["tier"] == "teacher"
    assert pieces[-1].protege["escalated"] and pieces[-1].protege["logged"] is True
    assert "".join(p.choices[0].text for p in pieces if p.choices) == (
        greedy["teacher", "completion"].text
    )


def test_refusals_are_in_openai_s_shape(url):
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(url).chat.completions.create(
            model=GENERATE, messages=CHAT, extra_body={"protege": {"force_tier": "teacher"}}
        )
    assert denied.value.body["type"] == "permission_error"
    assert "force_tier" in denied.value.body["message"]

    with pytest.raises(openai.AuthenticationError) as keyless:
        client(url).chat.completions.create(
            model=GENERATE, messages=CHAT, extra_headers={"Authorization": openai.Omit()}
        )
    assert keyless.value.body["type"] == "authentication_error"
    assert "missing API key" in keyless.value.body["message"]

    for extra, param in (
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            client(url).chat.completions.create(model=GENERATE, messages=CHAT, **extra)
        assert bad.value.param == param, bad.value.body

    with pytest.raises(openai.BadRequestError) as long:
        client(url).completions.create(model=GENERATE, prompt="the cat sat " * 40)
    assert long.value.code == "context_length_exceeded" and long.value.param == "prompt"

    with pytest.raises(openai.NotFoundError) as missing:
        client(url).chat.completions.create(model=CLASSIFY, messages=CHAT)
    assert f"{GENERATE} (generate)" in missing.value.body["message"]


def test_the_log_holds_one_record_per_escalated_request(url, escalated, gen_log):
    raw, pieces = escalated
    ids = sorted([raw.parse().protege["request_id"], pieces[0].protege["request_id"]])

    def records():
        return [r for r in iter_records(gen_log) if r.kind == "generate"]

    wait_for(lambda: len(records()) >= len(ids), timeout_s=30)
    logged = records()
    assert sorted(r.request_id for r in logged) == ids  # none for the kept answers
    assert all(r.schema_version == 4 and r.teacher_status == "answered" for r in logged)
    assert all(r.reason == "forced" and r.teacher_text for r in logged)
    chat = next(r for r in logged if r.messages is not None)
    assert chat.draft_accepted is not None and chat.teacher_version


def test_classify_answers_on_the_same_base_url(url):
    headers = {"Authorization": f"Bearer {PLAIN}"}
    body = {"inputs": ["Shares slide as oil prices jump"]}
    answer = httpx.post(f"{url}/v1/classify", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["label"]
    wrong = httpx.post(
        f"{url}/v1/classify", json={**body, "model": GENERATE}, headers=headers, timeout=60
    )
    assert wrong.status_code == 404 and GENERATE in wrong.json()["error"]
