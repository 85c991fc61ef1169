"""``serving.app:build_app``: the import path of deploy/serve_config.yaml.

    serve run deploy/serve_config.yaml          # or: protege serve

The builder validates the config (and the models' labels and threshold rule) before
anything is deployed, so a bad config fails at once with a message instead of a replica
crash loop.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application
from transformers import AutoConfig

from serving.access import load_keys
from serving.classify import meanpool
from serving.classify.teacher import Teacher
from serving.config import GatewayConfig
from serving.contracts.manifest import read_manifest
from serving.contracts.threshold import resolve_threshold
from serving.gateway import Gateway
from serving.hot_swap import import_loader


class ConfigError(ValueError):
    """The gateway config cannot serve; the message says what to change."""


def load_config(args: dict[str, Any] | GatewayConfig) -> GatewayConfig:
    if isinstance(args, GatewayConfig):
        return args
    try:
        return GatewayConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(f"invalid gateway config:\n{exc}") from None


def check_models(config: GatewayConfig) -> None:
    """Cheap checks on disk: both folders exist, labels match, a threshold can be resolved."""
    meanpool.register()
    labels = {}
    for role, spec in (("student", config.student), ("teacher", config.teacher)):
        if not (spec.path / "config.json").exists():
            raise ConfigError(
                f"{role}.path={spec.path} is not a model folder (no config.json); "
                "build the defaults with `protege models build` or point it at a HF classifier folder"
            )
        model_config = AutoConfig.from_pretrained(spec.path)
        labels[role] = [model_config.id2label[i] for i in range(model_config.num_labels)]
    if labels["student"] != labels["teacher"]:
        raise ConfigError(
            f"student labels {labels['student']} differ from teacher labels {labels['teacher']}"
        )
    try:
        import_loader(config.student_loader)
        resolve_threshold(config.cascade, read_manifest(config.student.path))
        load_keys(config.access)  # bad keys fail here, not in a crash-looping replica
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_app(args: dict[str, Any]) -> Application:
    config = load_config(args)
    check_models(config)
    teacher = Teacher.bind(  # type: ignore[attr-defined]
        config.teacher, config.batching, config.device, config.torch_threads
    )
    return Gateway.bind(config, teacher)  # type: ignore[attr-defined]
