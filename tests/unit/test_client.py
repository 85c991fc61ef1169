"""The client's retry and error behaviour against a scripted transport (the server is not
what these tests are about; the integration tests use the real one)."""

import httpx
import pytest

from serving.client import ProtegeClient, ProtegeError
from serving.schemas import ClassifyCascadeInfo

OK = {
    "request_id": "r1",
    "outputs": [
        {
            "label": "sport",
            "probabilities": {"sport": 0.9, "tech": 0.1},
            "confidence": 0.9,
            "tier": "student",
            "model_version": "s1",
            "escalated": False,
        }
    ],
}


def client_with(responses: list[httpx.Response], seen: list[httpx.Request]) -> ProtegeClient:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses.pop(0)

    client = ProtegeClient("http://gateway", backoff_s=0.0)
    client._http = httpx.Client(base_url="http://gateway", transport=httpx.MockTransport(handler))
    return client


def test_retries_503_then_succeeds():
    seen: list[httpx.Request] = []
    client = client_with(
        [httpx.Response(503), httpx.Response(503), httpx.Response(200, json=OK)], seen
    )
    result = client.classify("Striker scores", request_id="r1")
    assert result.outputs[0].label == "sport" and len(seen) == 3
    assert seen[0].headers["x-request-id"] == "r1"


def test_gives_up_after_the_retry_budget():
    seen: list[httpx.Request] = []
    client = client_with([httpx.Response(503)] * 5, seen)
    with pytest.raises(ProtegeError) as info:
        client.classify("x")
    assert info.value.status_code == 503 and len(seen) == 5


def test_4xx_is_not_retried_and_carries_the_message():
    seen: list[httpx.Request] = []
    client = client_with(
        [httpx.Response(422, json={"error": "inputs: must hold at least one text"})], seen
    )
    with pytest.raises(ProtegeError, match="must hold at least one text"):
        client.classify([])
    assert len(seen) == 1


def test_a_503_waits_at_least_its_retry_after(monkeypatch):
    import serving.client as client_module

    slept: list[float] = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    seen: list[httpx.Request] = []
    client = client_with(
        [httpx.Response(503, headers={"retry-after": "2"}), httpx.Response(200, json=OK)], seen
    )
    assert client.classify("x").outputs and slept == [2.0]


def test_the_api_key_goes_in_the_authorization_header():
    client = ProtegeClient("http://gateway", api_key="pk_secret")
    assert client._http.headers["authorization"] == "Bearer pk_secret"
    assert "authorization" not in ProtegeClient("http://gateway")._http.headers


def test_a_call_keeps_one_request_id_across_its_retries():
    seen: list[httpx.Request] = []
    client = client_with([httpx.Response(502), httpx.Response(200, json=OK)], seen)
    client.classify("x")
    ids = {request.headers["x-request-id"] for request in seen}
    assert len(seen) == 2 and len(ids) == 1  # a retry is recognisable in the log
    client = client_with([httpx.Response(200, json=OK)], seen)
    client.classify("y")
    assert seen[-1].headers["x-request-id"] not in ids  # a new call, a new id


def listing(*names: str) -> dict:
    entry = {
        "object": "model",
        "created": 1,
        "owned_by": "protege",
        "protege": {
            "kind": "classify",
            "student": {"version": "s1", "labels": ["a"], "max_tokens": 8},
            "teacher": {"version": "t1", "labels": ["a"], "max_tokens": 8},
            "scorer": "max_prob",
            "threshold": 0.5,
            "threshold_rule": "fixed threshold 0.5",
            "audit_fraction": 0.02,
            "swap": {
                "loading": None,
                "swaps": 0,
                "failures": 0,
                "superseded": 0,
                "last_error": None,
                "last_swap_seconds": None,
                "following": "its student.path",
            },
        },
    }
    return {"object": "list", "data": [{**entry, "id": name} for name in names]}


def test_model_gives_the_entry_of_a_cascade_by_name():
    seen: list[httpx.Request] = []
    client = client_with([httpx.Response(200, json=listing("protege-classify", "b"))] * 2, seen)
    entry = client.model()  # the classification cascade's default name
    assert entry.id == "protege-classify" and isinstance(entry.protege, ClassifyCascadeInfo)
    assert entry.protege.student.version == "s1"
    assert client.model("b").id == "b"
    assert [r.url.path for r in seen] == ["/v1/models"] * 2
    client = client_with([httpx.Response(200, json=listing("b"))], seen)
    with pytest.raises(LookupError, match="no cascade named 'protege-classify' here; hosted: b"):
        client.model()


def test_an_error_in_openais_shape_raises_its_message():
    body = {"error": {"message": "teacher unavailable", "type": "server_error", "param": None}}
    client = client_with([httpx.Response(503, json=body)], [])
    client.retries = 0
    with pytest.raises(ProtegeError, match=r"HTTP 503: teacher unavailable$"):
        client.models()
