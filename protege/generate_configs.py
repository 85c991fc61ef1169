"""The default generative pair's configs, written beside it by ``protege models
build-generate``: a serve config hosting it (with the classification task when that was
built) and its distillation job's config (``kind: generate``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from protege.default_generate import GenerateProfile


def write_configs(cache: Path, profile: GenerateProfile) -> tuple[Path, Path]:
    """``<cache>/generate/serve_config.yaml`` and ``distill.yaml``."""
    return write_serve_config(cache), write_distill_config(cache, profile)


def generate_section(root: Path) -> dict[str, Any]:
    """The generative cascade of the default pair, as a serve config's ``generate``
    section: its own registry (the seed is current) and its own log folder; the threshold
    comes from the version's calibration for the target stored with it."""
    root = root.resolve()
    return {
        "name": "protege-generate",
        "student": {"path": str(root / "models" / "student")},
        "teacher": {"path": str(root / "models" / "teacher")},
        "registry": str(root / "registry"),
        "registry_cache_dir": str(root / "registry-cache"),
        "log": {"dir": str(root / "generations")},
    }


def generative_gateway(section: dict[str, Any], **args: Any) -> dict[str, Any]:
    """A Serve config of one gateway hosting the generative cascade ``section`` alone
    (``args``: more of the gateway's settings), validated."""
    from distill.prepare import local_serve_config
    from serving.config import GatewayConfig

    config = local_serve_config({**args, "generate": section}, "GenerativeTeacher")
    GatewayConfig.model_validate(config["applications"][0]["args"])
    return config


def write_serve_config(cache: Path) -> Path:
    """``<cache>/generate/serve_config.yaml``: the classification task's serve config
    (``<cache>/serve_config.yaml``, when it was built) with the generative cascade added,
    else a gateway hosting the generative cascade alone. Validated before it is written."""
    import yaml

    from serving.config import GatewayConfig

    root = cache / "generate"
    base = cache / "serve_config.yaml"
    if base.exists():
        config = yaml.safe_load(base.read_text())
        app = config["applications"][0]
        app["args"]["generate"] = generate_section(root)
        deployments = app.setdefault("deployments", [])
        if not any(d.get("name") == "GenerativeTeacher" for d in deployments):
            deployments.append(
                {
                    "name": "GenerativeTeacher",
                    "num_replicas": 1,
                    "ray_actor_options": {"num_cpus": 0.5},
                }
            )
        GatewayConfig.model_validate(app["args"])
    else:
        config = generative_gateway(generate_section(root))
    path = root / "serve_config.yaml"
    header = "# Written by `protege models build-generate`: serve it with `protege serve --config THIS`.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def write_distill_config(cache: Path, profile: GenerateProfile) -> Path:
    """``<cache>/generate/distill.yaml``: the generative cascade's distillation job over
    its registry and log, the teacher answering offline, calibration falling back on the
    traffic prompts and the gold headlines as the non-inferiority check. Validated before
    it is written."""
    import yaml

    from distill.generate_config import GenerateDistillConfig
    from serving.generate.config import DEFAULT_SCORER

    root = (cache / "generate").resolve()
    section = generate_section(root)
    config = {
        "kind": "generate",
        "registry": section["registry"],
        "log_dir": section["log"]["dir"],
        "teacher": section["teacher"]["path"],
        "traffic": str(root / "data" / "traffic.jsonl"),
        "gold": str(root / "data" / "gold.jsonl"),
        "cache_dir": str(root / "cache"),
        "scorer": DEFAULT_SCORER,
        "agreement_cut": profile.agreement_cut,
        "max_prompt_tokens": profile.max_prompt_tokens,
        "max_new_tokens": profile.max_new_tokens,
        "batch_size": profile.batch_size,
        "gate": {"target_agreement": profile.target_agreement},
    }
    GenerateDistillConfig.model_validate(config)
    path = root / "distill.yaml"
    header = "# Written by `protege models build-generate`: `protege distill run --config THIS`.\n"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path
