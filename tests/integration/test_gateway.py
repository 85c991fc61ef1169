"""The cascade on a real local Ray Serve: decisions, tiers, versions, the log, bad input."""

import time

import httpx
import numpy as np
import openai
import pytest
from conftest import auth, steering, tiny_config, wait_for

from serving.classify.classifier import Classifier
from serving.classify.scorers import get_scorer
from serving.client import ProtegeClient, ProtegeError
from serving.contracts.records import iter_records

pytestmark = pytest.mark.integration
NAME = "bbc-topics:tiny"  # cascade.name: this gateway's model id (the default is tested elsewhere)

TEXTS = [
    "Shares slide as oil prices jump",
    "Film star wins award at festival",
    "Minister defends new budget plan",
    "Striker scores twice in cup final",
    "Chip maker unveils faster phone processor",
    "Bank raises interest rates again",
    "Band announces world tour dates",
    "Election campaign enters final week",
]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("escalations")


@pytest.fixture(scope="module")
def client(deploy, tiny_pair, log_dir) -> ProtegeClient:
    cascade = {"name": NAME, "threshold": 0.5, "audit_fraction": 1.0, "audit_teacher": "online"}
    return deploy("main", tiny_config(tiny_pair, log_dir, cascade=cascade))


@pytest.fixture(scope="module")
def student(tiny_pair) -> Classifier:
    return Classifier(tiny_pair[0], device="cpu")


def median_confidence(client: ProtegeClient) -> float:
    kept = client.classify(TEXTS, force_tier="student").outputs
    return float(np.median([o.confidence for o in kept]))


def test_escalates_exactly_when_confidence_is_below_threshold(client, student):
    threshold = median_confidence(client)
    outputs = client.classify(TEXTS, threshold=threshold).outputs
    expected = get_scorer("max_prob")(student.predict(TEXTS).probs)
    assert [o.confidence for o in outputs] == pytest.approx(expected.tolist(), abs=1e-5)
    models = client.model(NAME).protege
    escalated = [o.escalated for o in outputs]
    assert escalated == [c < threshold for c in expected]
    assert any(escalated) and not all(escalated)  # a real split, per input within one batch
    for output in outputs:
        assert output.tier == ("teacher" if output.escalated else "student")
        tier_model = models.teacher if output.escalated else models.student
        assert output.model_version == tier_model.version
        assert abs(sum(output.probabilities.values()) - 1) < 1e-4
        assert output.label == max(output.probabilities, key=output.probabilities.get)


def test_answers_carry_the_versions_of_both_tiers(client, student):
    models = client.model(NAME).protege
    assert models.student.version == student.version
    assert models.threshold == 0.5 and models.scorer == "max_prob"
    student_out = client.classify(TEXTS[0], force_tier="student").outputs[0]
    teacher_out = client.classify(TEXTS[0], force_tier="teacher").outputs[0]
    assert (student_out.tier, student_out.model_version) == ("student", models.student.version)
    assert (teacher_out.tier, teacher_out.model_version) == ("teacher", models.teacher.version)
    assert teacher_out.escalated and not teacher_out.degraded


def test_single_input_headers_and_request_id(client, serve_cluster):
    response = httpx.post(
        f"http://127.0.0.1:{serve_cluster}/main/v1/classify",
        json={"inputs": TEXTS[1], "force_tier": "teacher"},
        headers={"x-request-id": "my-request-7", **auth()},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == "my-request-7" == response.headers["x-request-id"]
    assert response.headers["x-protege-tier"] == "teacher"
    assert response.headers["x-protege-model-version"] == body["outputs"][0]["model_version"]


def test_escalations_and_audits_land_in_the_log_with_both_distributions(client, log_dir):
    threshold = median_confidence(client)
    result = client.classify(TEXTS, threshold=threshold, request_id="log-check-1")
    wanted = dict(zip(TEXTS, result.outputs, strict=True))

    def records():
        found = {r.text: r for r in iter_records(log_dir) if r.request_id == "log-check-1"}
        return found if len(found) == len(wanted) else None

    found = wait_for(records)  # audits of the kept inputs are written off the response path
    assert isinstance(found, dict)
    for text, output in wanted.items():
        record = found[text]
        # a client-chosen threshold steers routing: its escalations are logged as forced
        assert record.reason == ("forced" if output.escalated else "audit")
        assert record.inclusion_probability == 1.0  # escalated, or audited at fraction 1
        assert record.teacher_status == "answered" and record.teacher_probs is not None
        assert record.threshold == pytest.approx(threshold)
        assert record.confidence == pytest.approx(output.confidence, abs=1e-5)
        assert len(record.student_probs) == len(record.teacher_probs) == 5
        assert sum(record.teacher_probs) == pytest.approx(1, abs=1e-4)
        assert record.labels == list(output.probabilities)
        if output.escalated:
            assert record.teacher_probs == pytest.approx(
                list(output.probabilities.values()), abs=1e-5
            )
            assert record.teacher_version == output.model_version
    ids = [r.record_id for r in found.values()]
    assert len(set(ids)) == len(ids)  # made by the server, never from the client's id
    assert all(len(i) == 32 and "log-check" not in i for i in ids)


def test_forced_escalations_are_logged_as_forced_even_with_a_reused_request_id(client, log_dir):
    for _ in range(2):  # a client reusing its request id loses nothing from the log
        client.classify(TEXTS[:2], force_tier="teacher", request_id="forced-1")
    found = [r for r in iter_records(log_dir) if r.request_id == "forced-1"]
    assert len({r.record_id for r in found}) == 4
    assert {r.reason for r in found} == {"forced"}
    assert {r.inclusion_probability for r in found} == {1.0}


def test_text_longer_than_the_window_is_truncated_and_says_so(client):
    long_text = "a " * 100  # 200 characters (under max_chars), 100 tokens (over the 64 window)
    short, long = client.classify([TEXTS[0], long_text], force_tier="student").outputs
    assert not short.truncated and long.truncated


BAD_BODIES = [
    ({"inputs": []}, 422, "inputs: List should have at least 1 item"),
    ({"inputs": ["   "]}, 422, "inputs.0: is only whitespace"),
    ({"inputs": ["ok", 5]}, 422, "inputs.1: Input should be a valid string"),
    ({"inputs": "x" * 301}, 422, "inputs: String should have at most 300 characters"),
    ({"inputs": ["a"] * 9}, 422, "inputs: List should have at most 8 items"),
    ({"inputs": ["ok"], "colour": "red"}, 422, "colour: unknown field"),
    ({"inputs": ["ok"], "threshold": 2}, 422, "threshold: Input should be less than or equal to 1"),
    ({"inputs": ["ok"], "force_tier": "oracle"}, 422, "force_tier"),
    ({}, 422, "inputs: Field required"),
    ([1, 2], 422, "Input should be a valid dictionary"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_BODIES)
def test_bad_input_gets_a_4xx_naming_the_field(client, serve_cluster, body, status, message):
    url = f"http://127.0.0.1:{serve_cluster}/main/v1/classify"
    response = httpx.post(url, json=body, headers=auth())
    assert response.status_code == status
    assert message in response.json()["error"]


def test_body_that_is_not_json_gets_400(client, serve_cluster):
    response = httpx.post(
        f"http://127.0.0.1:{serve_cluster}/main/v1/classify",
        content=b"{inputs: nope",
        headers={"content-type": "application/json", **auth()},
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_client_raises_the_servers_message(client):
    with pytest.raises(ProtegeError, match="String should have at least 1 character") as info:
        client.classify([""])
    assert info.value.status_code == 422


def test_bad_input_never_harms_the_replica(client, serve_cluster):
    url = f"http://127.0.0.1:{serve_cluster}/main/v1/classify"
    for body, _, _ in BAD_BODIES * 3:
        httpx.post(url, json=body, headers=auth())
    assert client.classify(TEXTS).outputs  # still answering, same replica
    assert httpx.get(f"http://127.0.0.1:{serve_cluster}/main/healthz").json() == {"status": "alive"}


def test_openapi_docs_are_served(client, serve_cluster):
    spec = httpx.get(f"http://127.0.0.1:{serve_cluster}/main/openapi.json").json()
    assert "/v1/classify" in spec["paths"]


def test_models_is_openais_list_with_the_cascade_named_by_the_config(client, serve_cluster):
    url = f"http://127.0.0.1:{serve_cluster}/main"
    body = httpx.get(f"{url}/v1/models", headers=auth()).json()
    assert body["object"] == "list" and [e["id"] for e in body["data"]] == [NAME]
    (entry,) = body["data"]
    assert (entry["object"], entry["owned_by"]) == ("model", "protege")
    assert isinstance(entry["created"], int) and 0 < entry["created"] <= time.time()
    assert entry["protege"]["kind"] == "classify"
    assert entry["protege"]["threshold"] == 0.5 and entry["protege"]["audit_fraction"] == 1.0
    # the official client lists it
    listed = openai.OpenAI(base_url=f"{url}/v1", api_key=steering()[0]).models.list()
    assert [m.id for m in listed] == [NAME]
    assert listed.data[0].owned_by == "protege" and listed.data[0].created == entry["created"]
    with pytest.raises(LookupError, match=NAME):
        client.model("protege-classify")  # the default name: this gateway is named otherwise


def test_models_without_a_key_is_401_in_openais_shape(client, serve_cluster):
    url = f"http://127.0.0.1:{serve_cluster}/main/v1"
    response = httpx.get(f"{url}/models")
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in error["message"]
    with pytest.raises(openai.AuthenticationError, match="API key not recognised") as info:
        openai.OpenAI(base_url=url, api_key="not-a-key", max_retries=0).models.list()
    assert info.value.code == "invalid_api_key"  # the client read OpenAI's shape


def test_classify_may_name_its_cascade_and_another_name_is_a_404(client, serve_cluster):
    named = client.classify(TEXTS[:2], model=NAME, force_tier="student")
    unnamed = client.classify(TEXTS[:2], force_tier="student")
    assert [o.label for o in named.outputs] == [o.label for o in unnamed.outputs]
    url = f"http://127.0.0.1:{serve_cluster}/main/v1/classify"
    response = httpx.post(url, json={"inputs": "hi", "model": "gpt-4o"}, headers=auth())
    assert response.status_code == 404
    assert response.json() == {
        "error": f"model: 'gpt-4o' names no classify cascade hosted here; the models hosted "
        f"are: {NAME} (classify)"
    }
    with pytest.raises(ProtegeError, match=NAME) as info:
        client.classify("hi", model="protege-classify")
    assert info.value.status_code == 404
    response = httpx.post(url, json={"inputs": "hi", "model": "no spaces"}, headers=auth())
    assert response.status_code == 422
    assert response.json()["error"] == (
        "model: 'no spaces' is not a model id; GET /v1/models lists the ids"
    )
