"""``serving.app:build_app``: the import path of deploy/serve_config.yaml.

    serve run deploy/serve_config.yaml          # or: protege serve

The builder validates the config (the models' folders, labels, tokenizers and threshold
rules, the keys) before anything is deployed, so a bad config fails at once with a message
instead of a replica crash loop. It binds the teacher of every cascade the config hosts
(``Teacher`` for a classification cascade, ``GenerativeTeacher`` for a generative one,
none for a generative cascade whose teacher is a remote server) behind the one ingress,
``Gateway``.
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
from serving.generate.config import (
    GenerateCascadeConfig,
    LanguageModelSpec,
    RemoteTeacherSpec,
    resolve_limits,
)
from serving.generate.models import check_language_model, load_tokenizer
from serving.generate.remote_teacher import api_key
from serving.generate.teacher import GenerativeTeacher
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
    """Cheap checks on disk, for every cascade hosted; then the keys."""
    if config.classify:
        check_classify(config)
    if config.generate is not None:
        check_generate(config.generate)
    try:
        load_keys(config.access)  # bad keys fail here, not in a crash-looping replica
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_classify(config: GatewayConfig) -> None:
    """Both folders exist, labels match, a threshold can be resolved."""
    assert config.student is not None and config.teacher is not None
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
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_generate(config: GenerateCascadeConfig) -> None:
    """Both folders hold a causal LM in safetensors with a tokenizer that has a chat
    template; the student is a generative version whose threshold rule resolves and whose
    limits fit its window."""
    windows = {}
    models: list[tuple[str, LanguageModelSpec]] = [("student", config.student)]
    if isinstance(config.teacher, RemoteTeacherSpec):
        check_remote_teacher(config.teacher)
    else:
        models.append(("teacher", config.teacher))
    for role, spec in models:
        try:
            windows[role] = check_language_model(spec.path, f"generate.{role}.path={spec.path}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    manifest = read_manifest(config.student.path)
    if manifest is not None and manifest.kind != "generate":
        raise ConfigError(
            f"generate.student.path={config.student.path} holds {manifest.kind} version "
            f"{manifest.version}, not a generative one: point it at a causal-LM student"
        )
    try:
        resolve_threshold(config, manifest)
        resolve_limits(config, manifest, windows["student"])
    except ValueError as exc:
        raise ConfigError(
            f"generate: {exc} (the generative cascade's fields are under `generate`, for "
            "example generate.threshold)"
        ) from None


def check_remote_teacher(spec: RemoteTeacherSpec) -> None:
    """Its key variable is set when named (fail closed); its tokenizer, when given, loads.
    Whether the server answers is the readiness probe's concern, not the config's."""
    try:
        api_key(spec.api_key_env)
    except ValueError as exc:
        raise ConfigError(f"generate.teacher: {exc}") from None
    if spec.tokenizer is not None:
        try:
            load_tokenizer(spec.tokenizer)
        except Exception as exc:
            raise ConfigError(
                f"generate.teacher.tokenizer={spec.tokenizer}: it cannot be loaded ({exc}); "
                "point it at a folder holding the served model's tokenizer files"
            ) from None


def build_app(args: dict[str, Any]) -> Application:
    """The application: the ingress and the teacher of every cascade the config hosts."""
    config = load_config(args)
    check_models(config)
    teacher = None
    if config.teacher is not None:
        teacher = Teacher.bind(  # type: ignore[attr-defined]
            config.teacher, config.batching, config.device, config.torch_threads
        )
    generative_teacher = None
    if config.generate is not None and isinstance(config.generate.teacher, LanguageModelSpec):
        generative_teacher = GenerativeTeacher.bind(  # type: ignore[attr-defined]
            str(config.generate.teacher.path),
            config.generate.teacher_batching,
            config.device,
            config.torch_threads,
        )
    return Gateway.bind(config, teacher, generative_teacher)  # type: ignore[attr-defined]
