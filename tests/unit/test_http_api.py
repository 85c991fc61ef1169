"""The HTTP layer in process (no Ray): the guard, the limits in the schema, 401/403/413/422,
every refusal counted, and an OpenAPI document that states all of it."""

import asyncio
import json
import logging

import httpx
import pytest

from serving.access import Gatekeeper, new_key
from serving.classify.service import Answer, Routing
from serving.config import LimitsConfig
from serving.http_api import MODELS_UNAVAILABLE, Readiness, build_api
from serving.schemas import (
    ClassifyCascadeInfo,
    ClassifyOutput,
    ModelEntry,
    ModelInfo,
    ModelList,
    SwapStatus,
)

LIMITS = LimitsConfig(max_inputs=2, max_chars=10, max_body_bytes=400)
PLAIN, PLAIN_ENTRY = new_key("plain")
STEER, STEER_ENTRY = new_key("steer", overrides=True)


ENTRY = ModelEntry(
    id="topics",
    created=1_700_000_000,
    protege=ClassifyCascadeInfo(
        student=ModelInfo(version="s1", labels=["a"], max_tokens=8),
        teacher=ModelInfo(version="t1", labels=["a"], max_tokens=8),
        scorer="max_prob",
        threshold=0.5,
        threshold_rule="fixed threshold 0.5",
        audit_fraction=0.02,
        swap=SwapStatus(
            loading=None,
            swaps=0,
            failures=0,
            superseded=0,
            last_error=None,
            last_swap_seconds=None,
            following="its student.path",
        ),
    ),
)


class Backend:
    def __init__(self, teacher_up: bool = False) -> None:
        self.calls: list[tuple[list[str], Routing]] = []
        self.teacher_up = teacher_up

    async def classify(self, texts: list[str], request_id: str, routing: Routing) -> Answer:
        self.calls.append((texts, routing))
        output = ClassifyOutput(
            label="a",
            probabilities={"a": 1.0},
            confidence=1.0,
            tier="student",
            model_version="s1",
            escalated=False,
        )
        return Answer([output] * len(texts), None)

    async def models(self) -> ModelList:
        if not self.teacher_up:
            raise RuntimeError("teacher down")
        return ModelList(data=[ENTRY])

    def hosted(self) -> dict[str, str]:
        return {"topics": "classify", "chat": "generate"}

    async def readiness(self) -> Readiness:
        return Readiness(status="ready")

    def request_id(self, given: str | None) -> str:
        return given or "generated"


def make(keys=(PLAIN_ENTRY, STEER_ENTRY), anonymous_overrides=False, teacher_up=False):
    backend, rejected = Backend(teacher_up), []
    app = build_api(
        backend, LIMITS, Gatekeeper(list(keys), anonymous_overrides), lambda: rejected.append(1)
    )
    return app, backend, rejected


def call(app, method, path, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_request_without_a_key_is_401_before_its_body_is_read():
    app, backend, rejected = make()
    pulled = []

    async def body():
        pulled.append(1)
        yield b'{"inputs": ["hi"]}'

    response = call(app, "POST", "/v1/classify", content=body())
    assert response.status_code == 401 and pulled == []
    response = call(app, "POST", "/v1/classify", json={"inputs": ["hi"]})
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["error"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert call(app, "GET", "/v1/models").status_code == 401
    assert backend.calls == [] and len(rejected) == 3


def test_a_known_key_classifies_and_overrides_need_a_key_that_allows_them():
    app, backend, rejected = make()
    assert call(
        app, "POST", "/v1/classify", json={"inputs": "hi"}, headers=bearer(PLAIN)
    ).is_success
    forced = {"inputs": ["hi"], "force_tier": "teacher"}
    refused = call(app, "POST", "/v1/classify", json=forced, headers=bearer(PLAIN))
    assert refused.status_code == 403 and "force_tier" in refused.json()["error"]
    threshold = {"inputs": ["hi"], "threshold": 1.0}
    assert (
        call(app, "POST", "/v1/classify", json=threshold, headers=bearer(PLAIN)).status_code == 403
    )
    allowed = call(app, "POST", "/v1/classify", json=forced, headers=bearer(STEER))
    assert allowed.is_success
    assert [routing.force_tier for _, routing in backend.calls] == [None, "teacher"]
    assert len(rejected) == 2


def test_without_keys_anyone_classifies_but_only_configured_anonymous_overrides_pass():
    app, _, _ = make(keys=())
    assert call(app, "POST", "/v1/classify", json={"inputs": ["hi"]}).is_success
    forced = {"inputs": ["hi"], "force_tier": "student"}
    assert call(app, "POST", "/v1/classify", json=forced).status_code == 403
    app, _, _ = make(keys=(), anonymous_overrides=True)
    assert call(app, "POST", "/v1/classify", json=forced).is_success


def test_health_readiness_and_the_schema_stay_open():
    app, _, rejected = make()
    assert call(app, "GET", "/healthz").json() == {"status": "alive"}
    assert call(app, "GET", "/readyz").json()["status"] == "ready"
    assert call(app, "GET", "/openapi.json").is_success
    assert rejected == []


def test_a_body_over_the_limit_is_413_by_its_declared_length():
    app, backend, rejected = make()
    body = json.dumps({"inputs": ["x" * 500]}).encode()
    response = call(app, "POST", "/v1/classify", content=body, headers=bearer(PLAIN))
    assert response.status_code == 413
    assert "maximum of 400 bytes" in response.json()["error"]
    assert backend.calls == [] and rejected == [1]


def test_a_chunked_body_is_counted_as_it_arrives():
    app, backend, rejected = make()
    sent = []

    async def chunks():  # no Content-Length: httpx sends it chunked
        for _ in range(100):
            sent.append(1)
            yield b"x" * 100

    response = call(app, "POST", "/v1/classify", content=chunks(), headers=bearer(PLAIN))
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and backend.calls == [] and rejected == [1]
    assert len(sent) < 100  # refused before the whole body arrived


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": []}, "inputs: List should have at least 1 item"),
        ({"inputs": ["a", "b", "c"]}, "inputs: List should have at most 2 items"),
        ({"inputs": ["x" * 11]}, "inputs.0: String should have at most 10 characters"),
        ({"inputs": " \t"}, "inputs: is only whitespace"),
        ({"inputs": ["ok"], "extra": 1}, "extra: unknown field"),
    ],
)
def test_limits_are_422_naming_the_limit_before_any_model_work(body, message):
    app, backend, rejected = make()
    response = call(app, "POST", "/v1/classify", json=body, headers=bearer(STEER))
    assert response.status_code == 422 and message in response.json()["error"]
    assert backend.calls == [] and rejected == [1]


def test_a_body_that_is_not_json_is_400_and_counted():
    app, _, rejected = make()
    headers = {**bearer(PLAIN), "content-type": "application/json"}
    response = call(app, "POST", "/v1/classify", content=b"{nope", headers=headers)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
    assert rejected == [1]


def test_the_deadline_header_becomes_the_requests_deadline():
    app, backend, _ = make()
    headers = {**bearer(PLAIN), "x-protege-timeout-ms": "250"}
    assert call(app, "POST", "/v1/classify", json={"inputs": ["hi"]}, headers=headers).is_success
    assert backend.calls[0][1].deadline is not None
    headers["x-protege-timeout-ms"] = "0"
    assert (
        call(app, "POST", "/v1/classify", json={"inputs": ["hi"]}, headers=headers).status_code
        == 422
    )


def test_models_answers_503_with_a_fixed_body_when_the_teacher_is_down(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("ray.serve"), "propagate", True)  # Serve may unset it
    app, _, _ = make()
    response = call(app, "GET", "/v1/models", headers=bearer(PLAIN))
    assert response.status_code == 503
    assert response.json() == {  # OpenAI's shape: OpenAI's clients read it
        "error": {
            "message": MODELS_UNAVAILABLE,
            "type": "server_error",
            "param": None,
            "code": "teacher_unavailable",
        }
    }
    assert "teacher down" not in response.text and "RuntimeError" not in response.text
    assert "teacher down" in caplog.text  # the exception is logged instead


def test_the_openapi_document_states_the_limits_and_every_error():
    app, _, _ = make()
    spec = call(app, "GET", "/openapi.json").json()
    request = spec["components"]["schemas"]["ClassifyRequest"]["properties"]["inputs"]
    many, one = request["oneOf"]
    assert (many["minItems"], many["maxItems"]) == (1, 2)
    assert (one["minLength"], one["maxLength"], one["pattern"]) == (1, 10, r"\S")
    assert many["items"] == one
    responses = spec["paths"]["/v1/classify"]["post"]["responses"]
    assert {"200", "400", "401", "403", "408", "413", "422", "503"} <= set(responses)
    for status in ("400", "401", "403", "413", "422"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}
    for status in ("408", "503"):  # Serve's proxy answers these, in plain text
        assert responses[status]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def classify_scope(headers: dict[str, str]) -> dict:
    """A raw ASGI scope for POST /v1/classify (for messages httpx cannot send)."""
    return {
        "type": "http",
        "method": "POST",
        "path": "/v1/classify",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "query_string": b"",
    }


def test_a_client_that_leaves_mid_body_is_neither_answered_nor_counted():
    app, backend, rejected = make()
    sent: list[dict] = []
    messages = iter(
        [
            {"type": "http.request", "body": b'{"inputs": ', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    asyncio.run(app(classify_scope(bearer(PLAIN)), receive, send))
    assert sent == [] and backend.calls == [] and rejected == []


def test_a_content_length_that_is_not_a_number_is_not_a_500():
    app, _, _ = make()
    scope_headers = {**bearer(PLAIN), "content-length": "²", "content-type": "application/json"}
    guard = app.build_middleware_stack()  # the guard reads the header before anything else
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b'{"inputs": ["hi"]}', "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(guard(classify_scope(scope_headers), receive, send))
    assert sent[0]["status"] == 200


def test_models_lists_every_cascade_in_openais_shape():
    app, _, _ = make(teacher_up=True)
    response = call(app, "GET", "/v1/models", headers=bearer(PLAIN))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert {k: entry[k] for k in ("id", "object", "created", "owned_by")} == {
        "id": "topics",
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "protege",
    }
    assert entry["protege"]["kind"] == "classify"
    assert entry["protege"]["student"] == {"version": "s1", "labels": ["a"], "max_tokens": 8}
    assert ModelList.model_validate(body).entry("topics") == ENTRY
    with pytest.raises(LookupError, match=r"'chat'.*hosted: topics"):
        ModelList.model_validate(body).entry("chat")


def test_every_error_on_models_is_in_openais_shape_and_classifys_stay_plain():
    app, _, rejected = make()
    missing = call(app, "GET", "/v1/models").json()["error"]
    assert missing["type"] == "authentication_error" and missing["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in missing["message"]
    too_big = call(app, "GET", "/v1/models", content=b"x" * 500, headers=bearer(PLAIN))
    assert too_big.status_code == 413
    assert too_big.json()["error"]["type"] == "invalid_request_error"
    wrong_method = call(app, "POST", "/v1/models", headers=bearer(PLAIN))
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["message"] == "Method Not Allowed"
    plain = call(app, "POST", "/v1/classify", json={"inputs": ["hi"]}).json()
    assert isinstance(plain["error"], str)  # /v1/classify's shape is unchanged
    assert len(rejected) == 4


def test_classify_may_name_its_cascade_and_any_other_name_is_a_404():
    app, backend, rejected = make()
    named = {"inputs": ["hi"], "model": "topics"}
    assert call(app, "POST", "/v1/classify", json=named, headers=bearer(PLAIN)).is_success
    hosted = "the models hosted are: chat (generate), topics (classify)"
    for name in ("gpt-4o", "chat"):  # not hosted; hosted, but not a classification cascade
        body = {"inputs": ["hi"], "model": name}
        response = call(app, "POST", "/v1/classify", json=body, headers=bearer(STEER))
        assert response.status_code == 404
        assert response.json() == {
            "error": f"model: {name!r} names no classify cascade hosted here; {hosted}"
        }
    bad = call(
        app, "POST", "/v1/classify", json={"inputs": "hi", "model": ""}, headers=bearer(PLAIN)
    )
    assert bad.status_code == 422
    assert bad.json()["error"] == "model: '' is not a model id; GET /v1/models lists the ids"
    extra = call(app, "POST", "/v1/classify", json={"inputs": "hi", "x": 1}, headers=bearer(PLAIN))
    assert "allowed fields are inputs, threshold, force_tier, model" in extra.json()["error"]
    assert len(backend.calls) == 1 and len(rejected) == 4


def test_the_openapi_document_describes_the_models_list():
    spec = call(make()[0], "GET", "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    responses = spec["paths"]["/v1/models"]["get"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelList"
    }
    for status in ("401", "503"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/OpenAIErrorBody"}
    kinds = schemas["ModelEntry"]["properties"]["protege"]
    assert kinds["discriminator"]["propertyName"] == "kind"
    assert set(kinds["discriminator"]["mapping"]) == {"classify", "generate"}
    assert set(schemas["OpenAIError"]["properties"]) == {"message", "type", "param", "code"}
    classify = spec["paths"]["/v1/classify"]["post"]["responses"]["404"]["content"]
    assert classify["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
