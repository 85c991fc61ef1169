"""What a gateway hosts: a classification cascade, a generative one or both, named by its
config and checked before anything is deployed; /v1/classify on a gateway hosting none."""

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import pytest
from polling import wait_for
from pydantic import ValidationError
from tiny_lm import build_tiny_lm

from serving.access import Gatekeeper, new_key
from serving.app import ConfigError, check_models, load_config
from serving.config import GatewayConfig, LimitsConfig, SwapRequest
from serving.contracts.manifest import ModelManifest, write_manifest
from serving.contracts.registry import Registry
from serving.generate.config import GenerateCascadeConfig
from serving.generate.teacher_engine import TeacherInfo
from serving.http_api import Readiness, build_api
from serving.schemas import ModelList

KEY, ENTRY = new_key("plain")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "model", seed=1)


def generate(student, teacher=None, **fields) -> dict:
    return {"student": {"path": str(student)}, "teacher": {"path": str(teacher or student)}} | (
        fields
    )


def both(tmp_path, **generate_fields) -> dict:
    return {
        "student": {"path": str(tmp_path)},
        "teacher": {"path": str(tmp_path)},
        "generate": generate(tmp_path, **generate_fields),
    }


def test_a_classification_config_stays_valid_as_it_was(tmp_path):
    config = GatewayConfig.model_validate(
        {"student": {"path": tmp_path}, "teacher": {"path": tmp_path}}
    )
    assert config.classify and config.generate is None
    assert config.hosted() == {"protege-classify": "classify"}


def test_a_config_may_host_a_generative_cascade_alone_or_beside_one(tmp_path):
    alone = GatewayConfig.model_validate({"generate": generate(tmp_path)})
    assert not alone.classify and alone.student is None and alone.teacher is None
    assert alone.hosted() == {"protege-generate": "generate"}
    pair = GatewayConfig.model_validate(both(tmp_path))
    assert pair.hosted() == {"protege-classify": "classify", "protege-generate": "generate"}


def test_a_config_hosting_nothing_says_what_to_add():
    with pytest.raises(ValidationError, match=r"hosts no cascade: add student\.path and teacher"):
        GatewayConfig.model_validate({"cascade": {"threshold": 0.5}})


@pytest.mark.parametrize("given,missing", [("student", "teacher"), ("teacher", "student")])
def test_half_a_classification_cascade_names_the_missing_model(tmp_path, given, missing):
    with pytest.raises(ValidationError, match=f"needs both student and teacher: add {missing}"):
        GatewayConfig.model_validate({given: {"path": str(tmp_path)}})


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"name": "protege-classify"}, r"cascade\.name and generate\.name are both"),
        ({"log": {"dir": "var/cache/escalations"}}, r"log\.dir and generate\.log\.dir are"),
    ],
)
def test_two_cascades_never_share_a_name_or_a_log(tmp_path, fields, message):
    with pytest.raises(ValidationError, match=message):
        GatewayConfig.model_validate(both(tmp_path, **fields))


def test_two_cascades_never_share_a_registry(tmp_path):
    args = both(tmp_path, registry=str(tmp_path / "registry")) | {
        "registry": str(tmp_path / "registry")
    }
    with pytest.raises(ValidationError, match=r"registry and generate\.registry are both"):
        GatewayConfig.model_validate(args)


def test_user_config_pins_each_cascade_on_its_own():
    swap = SwapRequest.model_validate(
        {"student_version": "v1", "generate": {"student_version": "g2", "threshold": 0.3}}
    )
    assert (swap.student_version, swap.threshold) == ("v1", None)
    assert (swap.generate.student_version, swap.generate.threshold) == ("g2", 0.3)
    assert SwapRequest.model_validate({}).generate.student_version is None


def checked(student, teacher=None, **fields) -> None:
    access = {"required": False}
    check_models(load_config({"generate": generate(student, teacher, **fields), "access": access}))


def test_a_generative_pair_with_a_threshold_rule_passes(lm):
    checked(lm, threshold=0.5)


def test_a_missing_folder_says_how_to_build_the_pair(tmp_path, lm):
    with pytest.raises(
        ConfigError, match=r"generate\.student\.path=.*`protege models build-generate`"
    ):
        checked(tmp_path / "nope", lm, threshold=0.5)


def test_weights_must_be_safetensors(tmp_path, lm):
    folder = tmp_path / "bin"
    shutil.copytree(lm, folder)
    for weights in folder.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ConfigError, match=r"generate\.teacher\.path=.* no \*\.safetensors"):
        checked(lm, folder, threshold=0.5)


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path, lm):
    plain = build_tiny_lm(tmp_path / "plain", seed=1, template=False)
    with pytest.raises(ConfigError, match=r"generate\.student\.path=.* has no chat template"):
        checked(plain, lm, threshold=0.5)


def test_no_threshold_rule_names_the_generate_section(lm):
    with pytest.raises(ConfigError, match=r"generate: no threshold.*generate\.threshold"):
        checked(lm)


def test_a_classification_version_is_no_generative_student(tmp_path, lm):
    folder = tmp_path / "classifier-version"
    shutil.copytree(lm, folder)
    manifest = ModelManifest(version="c1", role="student", created_at=time.time())
    write_manifest(folder, manifest)
    with pytest.raises(ConfigError, match="holds classify version c1, not a generative one"):
        checked(folder, lm, threshold=0.5)


def test_limits_that_leave_no_room_for_a_prompt_are_refused(lm):
    with pytest.raises(ConfigError, match="max_new_tokens 300 leaves no room"):
        checked(lm, threshold=0.5, max_new_tokens=300)  # the tiny model's window is 256


class Recorder:
    """Metrics that remember (the replica's are Ray's)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, tuple], float] = {}

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        key = (name, tuple(sorted(tags.items())))
        self.counts[key] = self.counts.get(key, 0) + value

    def set(self, name: str, value: float, **tags: str) -> None: ...

    def observe(self, name: str, value: float, **tags: str) -> None: ...

    def log_written(self, records: int, size: int, rotations: int) -> None: ...


class Call:
    """A handle method: ``.remote()`` gives an awaitable, as a DeploymentResponse."""

    def __init__(self, value) -> None:
        self.value = value

    def remote(self):
        async def answer():
            return self.value

        return answer()


class TeacherHandle:
    info = Call(TeacherInfo(version="teacher-1", tokenizer_digest=None))


def version_of(lm, tmp_path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(lm, folder)
    manifest = ModelManifest(version=name, role="student", created_at=1.0e9, kind="generate")
    write_manifest(folder, manifest)
    return folder


def test_the_generative_cascade_follows_its_own_registry_and_pins(tmp_path, lm):
    from serving.generate.host import GenerateHost

    registry = Registry(tmp_path / "registry")
    for name in ("g1", "g2"):
        registry.import_folder(version_of(lm, tmp_path, name))
    registry.promote("g1")
    config = GenerateCascadeConfig.model_validate(
        generate(lm, threshold=0.5, registry=str(registry.root))
        | {"log": {"dir": str(tmp_path / "log")}, "max_new_tokens": 4}
    )
    metrics = Recorder()
    host = GenerateHost(
        config,
        TeacherHandle(),
        metrics,  # type: ignore[arg-type]
        replica="r1",
        started=7,
        device="cpu",
        s3_endpoint=None,
        unready_after_s=30.0,
    )
    try:
        assert host.slot.active.version == "g1"  # the pointer's, not generate.student.path
        registry.promote("g2")
        host.following.poll()
        wait_for(lambda: host.slot.active.version == "g2")
        entry = asyncio.run(host.entry())
        assert (entry.id, entry.created) == ("protege-generate", 1_000_000_000)
        assert entry.protege.student.version == "g2" and entry.protege.teacher.version == (
            "teacher-1"
        )
        assert entry.protege.swap.pointer == "g2" and entry.protege.swap.swaps == 1

        host.following.configure("g1", 0.25)  # a pin holds against the pointer
        assert host.slot.active.version == "g1" and host.slot.active.rule.value == 0.25
        host.following.poll()
        assert host.slot.active.version == "g1"
        assert entry.protege.max_new_tokens == 4
        with pytest.raises(Exception, match="g9"):
            host.following.configure("g9", None)
        host.following.refused("no such version g9")
        assert "user_config refused" in host.slot.stats.last_error
        assert metrics.counts[("protege_hot_swaps", (("result", "success"),))] == 2
    finally:
        host.close()


class GenerativeOnly:
    """A backend hosting one generative cascade and no classification one."""

    async def classify(self, *args):
        raise AssertionError("never reached: the route refuses first")

    async def models(self) -> ModelList:
        return ModelList(data=[])

    def hosted(self) -> dict[str, str]:
        return {"chat": "generate"}

    async def readiness(self) -> Readiness:
        return Readiness(status="ready")

    def request_id(self, given: str | None) -> str:
        return "r1"


def test_classify_on_a_gateway_hosting_no_classification_cascade_is_a_404():
    rejected: list[int] = []
    app = build_api(
        GenerativeOnly(), LimitsConfig(), Gatekeeper([ENTRY]), lambda: rejected.append(1)
    )

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"Authorization": f"Bearer {KEY}"}
            return await client.post("/v1/classify", json={"inputs": "hi"}, headers=headers)

    response = asyncio.run(post())
    assert response.status_code == 404 and rejected == [1]
    assert response.json() == {
        "error": "model: this gateway hosts no classify cascade; the models hosted are: "
        "chat (generate)"
    }
