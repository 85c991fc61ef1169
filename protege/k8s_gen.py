"""``protege k8s generate``: the cluster's configs, generated from the local ones so the two
never drift.

- ``k8s/base/generated/rayservice.yaml``: ``k8s/templates/rayservice.yaml`` whose
  ``serveConfigV2`` is ``deploy/serve_config.yaml`` with the fields that must differ on the
  cluster set here and nowhere else (:data:`CLUSTER_SERVE`, :func:`cluster_args`: the
  HTTP host, the storage URIs, each pod's own folders), hosting both kinds: the
  classification cascade and the generative one (:func:`cluster_generate`) behind one
  ingress;
- ``k8s/base/generated/rayjob.yaml`` and ``distill-cron.yaml``: one distillation RayJob, and
  the RayCronJob whose ``jobTemplate`` is that RayJob's spec;
- ``k8s/base/generated/distill.yaml``: ``deploy/distill.yaml`` with the registry and the log
  in the object store, the models and data on the read-only volume (:data:`DATA`), mounted
  from a ConfigMap;
- the generative cascade's job likewise: ``distill-generate.yaml`` from
  ``deploy/distill-generate.yaml`` (:func:`cluster_distill_generate`), its RayJob
  ``rayjob-generate.yaml`` (the same spec, its entrypoint naming that config) and its
  RayCronJob ``distill-generate-cron.yaml``.

Both are validated before they are written (Serve's deploy schema and the gateway's own
config for the first, the distillation config for the second): a config that cannot run
on the cluster fails here with its error, not in a pod. ``--check`` compares instead of
writing (the test suite runs it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DATA = "/data"  # a read-only volume with the models and the task's data (k8s/base/storage.yaml)
LOCAL = "/var/protege"  # each pod's own disk (an emptyDir): log segments before shipping, caches
STORAGE = "s3://protege"  # the object store: registry and shipped log (--storage to change)
CLUSTER_SERVE: dict[str, Any] = {
    # pods have their own network namespace: listen on it (the NetworkPolicy limits who may
    # reach which port); Ray's HAProxy ingress is switched on in the pod env
    "http_options": {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 30},
    "proxy_location": "EveryNode",
}


def cluster_args(storage: str) -> dict[str, Any]:
    """The gateway's args that differ on the cluster (set here and nowhere else)."""
    return {
        "student": {"path": f"{DATA}/models/student"},
        "teacher": {"path": f"{DATA}/models/teacher"},
        "registry": f"{storage}/registry",
        "registry_cache_dir": f"{LOCAL}/registry-cache",
        "log": {"dir": f"{LOCAL}/escalations", "ship_to": f"{storage}/escalations"},
        # keys from the protege-secrets Secret (PROTEGE_API_KEYS), always required (the
        # local config's `required: false` never reaches the cluster); overrides only per key
        "access": {
            "keys_file": None,
            "keys_env": "PROTEGE_API_KEYS",
            "required": True,
            "anonymous_overrides": False,
        },
    }


def cluster_generate(storage: str) -> dict[str, Any]:
    """The generative cascade the RayService hosts beside the classification one: the
    default pair on the read-only volume (``protege models build-generate`` writes it to
    ``<cache>/generate``), its own registry and log in the object store."""
    return {
        "name": "protege-generate",
        "student": {"path": f"{DATA}/generate/models/student"},
        "teacher": {"path": f"{DATA}/generate/models/teacher"},
        "registry": f"{storage}/generate/registry",
        "registry_cache_dir": f"{LOCAL}/generate-registry-cache",
        "log": {"dir": f"{LOCAL}/generations", "ship_to": f"{storage}/generations"},
    }


GENERATIVE_TEACHER = {
    "name": "GenerativeTeacher",
    "num_replicas": 1,
    "max_ongoing_requests": 64,
    "max_queued_requests": 128,
    "ray_actor_options": {"num_cpus": 0.5},
}


def cluster_distill(storage: str) -> dict[str, Any]:
    """The distillation config's fields that differ on the cluster."""
    return {
        "registry": f"{storage}/registry",
        "log_dir": f"{storage}/escalations",
        "teacher": f"{DATA}/models/teacher",
        "traffic": f"{DATA}/data/traffic.jsonl",
        "gold": f"{DATA}/data/gold.jsonl",
        "work_dir": f"{LOCAL}/distill-work",
        "cache_dir": None,
        "pushgateway": "protege-pushgateway:9091",
    }


def cluster_distill_generate(storage: str) -> dict[str, Any]:
    """The generative job's fields that differ on the cluster: the registry and the log the
    RayService's generative cascade uses (:func:`cluster_generate`), the pair on the volume."""
    served = cluster_generate(storage)
    return {
        "registry": served["registry"],
        "log_dir": served["log"]["ship_to"],
        "teacher": served["teacher"]["path"],
        "traffic": f"{DATA}/generate/data/traffic.jsonl",
        "gold": f"{DATA}/generate/data/gold.jsonl",
        "work_dir": f"{LOCAL}/distill-generate-work",
        "cache_dir": None,
        "pushgateway": "protege-pushgateway:9091",
    }


TEACHER_KEY_ENV = "PROTEGE_TEACHER_API_KEY"  # a remote teacher's key, from protege-secrets
CONFIG_MOUNT = "/etc/protege"  # where the protege-distill ConfigMap is mounted in job pods

HEADER = "# Generated by `protege k8s generate` from {source}: edit those, not this file.\n"


class GenerateError(ValueError):
    """A local config that cannot be embedded in the cluster's; the message says why."""


def serve_config(source: Path, storage: str = STORAGE) -> dict[str, Any]:
    config = copy.deepcopy(yaml.safe_load(source.read_text()))
    config.update(copy.deepcopy(CLUSTER_SERVE))
    for app in config.get("applications", []):
        args = app.setdefault("args", {})
        for key, value in cluster_args(storage).items():
            args[key] = {**args.get(key, {}), **value} if isinstance(value, dict) else value
        generate = cluster_generate(storage)
        remote = "url" in (args.get("generate") or {}).get("teacher", {})
        if remote:  # a teacher behind its own server: kept as written, no deployment for it
            generate.pop("teacher")
            teacher = args["generate"]["teacher"]
            if teacher.get("api_key_env"):  # its key comes from the protege-secrets Secret
                args["generate"]["teacher"] = {**teacher, "api_key_env": TEACHER_KEY_ENV}
        args["generate"] = {**args.get("generate", {}), **generate}
        deployments = app.setdefault("deployments", [])
        if remote:
            deployments[:] = [d for d in deployments if d.get("name") != GENERATIVE_TEACHER["name"]]
        elif not any(d.get("name") == GENERATIVE_TEACHER["name"] for d in deployments):
            deployments.append(copy.deepcopy(GENERATIVE_TEACHER))
    _check_serve(config, source)
    return config


def distill_config(source: Path, storage: str = STORAGE) -> dict[str, Any]:
    """The distillation config of either kind, with the cluster's fields, validated."""
    config = copy.deepcopy(yaml.safe_load(source.read_text()))
    generative = config.get("kind") == "generate"
    config.update(cluster_distill_generate(storage) if generative else cluster_distill(storage))
    config = {k: v for k, v in config.items() if v is not None}
    if isinstance(config.get("replay"), dict) and config["replay"].get("examples"):
        config["replay"]["examples"] = f"{DATA}/data/seed.jsonl"
    from distill.config import DistillConfig
    from distill.generate_config import GenerateDistillConfig

    try:
        (GenerateDistillConfig if generative else DistillConfig).model_validate(config)
    except ValueError as exc:
        raise GenerateError(f"{source} cannot run on the cluster:\n{exc}") from None
    return config


def generative_job(job: dict[str, Any]) -> dict[str, Any]:
    """The distillation RayJob running the generative job's config instead."""
    generative = copy.deepcopy(job)
    generative["metadata"]["generateName"] = "protege-distill-generate-"
    generative["spec"]["entrypoint"] = (
        f"protege distill run --config {CONFIG_MOUNT}/distill-generate.yaml"
    )
    return generative


def _check_serve(config: dict[str, Any], source: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from serving.config import GatewayConfig

    try:
        ServeDeploySchema.model_validate(config)
        for app in config["applications"]:
            GatewayConfig.model_validate(app["args"])
    except ValueError as exc:
        raise GenerateError(f"{source} cannot be embedded in the RayService:\n{exc}") from None


def _literal_blocks(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(str, _literal_blocks)


def render(document: dict[str, Any], source: str) -> str:
    return HEADER.format(source=source) + yaml.dump(document, Dumper=_Dumper, sort_keys=False)


def _template(root: Path, name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((root / "k8s/templates" / name).read_text()))


def outputs(root: Path, storage: str = STORAGE) -> dict[Path, str]:
    """Every generated file and its text."""
    if not storage.startswith("s3://"):
        raise GenerateError(f"--storage {storage!r}: the cluster needs an s3:// URI")
    storage = storage.rstrip("/")
    serve = serve_config(root / "deploy/serve_config.yaml", storage)
    service = _template(root, "rayservice.yaml")
    service["spec"]["serveConfigV2"] = yaml.safe_dump(serve, sort_keys=False)
    job = _template(root, "rayjob.yaml")
    cron = _template(root, "distill-cron.yaml")
    cron["spec"]["jobTemplate"] = copy.deepcopy(job["spec"])
    job_generate = generative_job(job)
    cron_generate = _template(root, "distill-generate-cron.yaml")
    cron_generate["spec"]["jobTemplate"] = copy.deepcopy(job_generate["spec"])
    sources = "deploy/serve_config.yaml and k8s/templates/rayservice.yaml"
    generated = root / "k8s/base/generated"
    return {
        generated / "rayservice.yaml": render(service, sources),
        generated / "rayjob.yaml": render(job, "k8s/templates/rayjob.yaml"),
        generated / "distill-cron.yaml": render(
            cron, "k8s/templates/distill-cron.yaml and k8s/templates/rayjob.yaml"
        ),
        generated / "distill.yaml": render(
            distill_config(root / "deploy/distill.yaml", storage), "deploy/distill.yaml"
        ),
        generated / "rayjob-generate.yaml": render(job_generate, "k8s/templates/rayjob.yaml"),
        generated / "distill-generate-cron.yaml": render(
            cron_generate, "k8s/templates/distill-generate-cron.yaml and k8s/templates/rayjob.yaml"
        ),
        generated / "distill-generate.yaml": render(
            distill_config(root / "deploy/distill-generate.yaml", storage),
            "deploy/distill-generate.yaml",
        ),
    }


def generate(root: Path, check: bool = False, storage: str = STORAGE) -> list[str]:
    """Write (or with ``check``, compare) the generated files; returns the stale ones."""
    stale = []
    for path, text in outputs(root, storage).items():
        if not path.exists() or path.read_text() != text:
            stale.append(str(path.relative_to(root)))
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    return stale
