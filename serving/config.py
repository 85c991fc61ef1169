"""The gateway's configuration: one pydantic model, one YAML file for local runs and the cluster.

``deploy/serve_config.yaml`` passes these fields as the application's ``args``; every
field has a default here and nowhere else. One gateway (one Serve application, one
ingress) hosts the cascades its config names: a classification cascade (``student`` and
``teacher``, with ``cascade`` and the other top-level sections), a generative one
(``generate``, :class:`serving.generate.config.GenerateCascadeConfig`), or both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

# shared with every kind's config; re-exported here for existing imports
from serving.config_sections import (  # noqa: F401
    DEFAULT_SEGMENT_BYTES,
    AccessConfig,
    BatchingConfig,
    LogConfig,
)
from serving.contracts import defaults
from serving.contracts.storage import StoreURI
from serving.contracts.threshold import check_one_rule
from serving.generate.config import GenerateCascadeConfig
from serving.schemas import CLASSIFY_CASCADE, MODEL_ID

DEFAULT_MAX_INPUTS = 64
DEFAULT_MAX_CHARS = 4000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    path: Path = Field(description="A Hugging Face sequence-classification folder")
    max_tokens: PositiveInt = Field(
        default=defaults.MAX_TOKENS,
        description="Truncate inputs to this many tokens (as in training and calibration)",
    )


class CascadeConfig(_Strict):
    name: str = Field(
        default=CLASSIFY_CASCADE,
        description="The cascade's model id: its entry on /v1/models, the `model` a "
        "/v1/classify request may name (letters, digits, '.', '_', ':', '-'; at most 64)",
    )
    scorer: str = Field(
        default=defaults.SCORER,
        description="A classification scorer: max_prob, margin or neg_entropy",
    )
    threshold: float | None = Field(
        default=None, ge=0, le=1, description="Escalate when confidence < threshold"
    )
    target_escalation_rate: float | None = Field(
        default=None, ge=0, le=1, description="Derive the threshold from the version's calibration"
    )
    target_agreement: float | None = Field(
        default=None, ge=0, le=1, description="Derive the threshold for this teacher agreement"
    )
    audit_fraction: float = Field(
        default=defaults.AUDIT_FRACTION,
        ge=0,
        le=1,
        description="Share of confident inputs logged as a uniform sample; the gate's evidence "
        "(0 turns the sample, and so every promotion, off)",
    )
    audit_teacher: Literal["offline", "online"] = Field(
        default="offline",
        description="offline: log audited inputs with the student's answer only, the "
        "distillation job asks the teacher in batch; online: ask the teacher now, off the "
        "response path",
    )

    @field_validator("name")
    @classmethod
    def _model_id(cls, name: str) -> str:
        if not re.fullmatch(MODEL_ID, name):
            raise ValueError(
                f"{name!r} is not a model id: start with a letter or digit, then at most 63 "
                "letters, digits, '.', '_', ':' or '-' (for example 'protege-classify')"
            )
        return name

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, name: str) -> str:
        from serving.classify.scorers import known_scorer  # the kind's, only when validating

        return known_scorer(name)

    @model_validator(mode="after")
    def _one_rule(self) -> CascadeConfig:
        check_one_rule(self)
        return self


class LimitsConfig(_Strict):
    """Checked before any model work: the body size as its bytes arrive (413), then the
    request schema, which carries the other two (422); the OpenAPI schema states all three."""

    max_inputs: PositiveInt = Field(default=DEFAULT_MAX_INPUTS, description="Inputs per request")
    max_chars: PositiveInt = Field(default=DEFAULT_MAX_CHARS, description="Characters per input")
    max_body_bytes: PositiveInt | None = Field(
        default=None,
        description="Request body bytes; by default what the largest valid request needs "
        "(every character escaped as a surrogate pair, 12 bytes, plus room for the rest)",
    )

    @property
    def body_bytes(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return self.max_inputs * (self.max_chars * 12 + 4) + 4096


class OverloadConfig(_Strict):
    """Bounds that keep the student path fast when the teacher is slow or traffic spikes."""

    teacher_max_in_flight: PositiveInt = Field(
        default=64,
        description="Escalated inputs waiting on the teacher at once per replica; beyond it an "
        "escalated input gets the student's answer at once, marked degraded (the bulkhead)",
    )
    audits_max_in_flight: PositiveInt = Field(
        default=16,
        description="Online audits waiting on the teacher per replica; beyond it audits are "
        "logged for offline labelling and counted as deferred",
    )


class GatewayConfig(_Strict):
    """What a gateway hosts and how. ``student`` and ``teacher`` make the classification
    cascade (``cascade``, ``batching``, ``overload``, ``log``, ``registry`` and the teacher
    timeouts are its settings); ``generate`` makes the generative cascade, with its own
    sections. ``limits``, ``access``, ``device``, ``torch_threads``, ``s3_endpoint``,
    ``registry_poll_s`` and ``teacher_unready_after_s`` apply to every cascade hosted."""

    student: ModelSpec | None = Field(
        default=None,
        description="The classification cascade's student (with `teacher`); leave both out "
        "to host only a generative cascade",
    )
    teacher: ModelSpec | None = Field(
        default=None, description="The classification cascade's teacher (with `student`)"
    )
    cascade: CascadeConfig = CascadeConfig()
    generate: GenerateCascadeConfig | None = Field(
        default=None,
        description="A generative cascade (OpenAI-compatible chat and completions), hosted "
        "beside the classification one or alone",
    )
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    access: AccessConfig = AccessConfig()
    overload: OverloadConfig = OverloadConfig()
    log: LogConfig = LogConfig()
    teacher_timeout_s: PositiveFloat = Field(
        default=10.0, description="After this, answer with the student and degraded=true"
    )
    teacher_unready_after_s: NonNegativeFloat = Field(
        default=30.0,
        description="/readyz answers 503 once every teacher call has failed for this long",
    )
    registry: StoreURI | None = Field(
        default=None,
        description="Model registry (a folder or s3://bucket/prefix): every replica serves "
        "its current version "
        "(polled every registry_poll_s); user_config {student_version} pins another",
    )
    registry_cache_dir: Path = Field(
        default=Path("var/cache/registry-cache"),
        description="Where a replica keeps the versions it downloads from an object store",
    )
    s3_endpoint: str | None = Field(
        default=None,
        description="The S3-compatible endpoint for s3:// URIs (default $AWS_ENDPOINT_URL; "
        "credentials from the AWS environment variables)",
    )
    registry_poll_s: PositiveFloat = Field(
        default=5.0,
        description="How often each replica reads the registry's current pointer and swaps "
        "to the version it names (unless user_config pins one)",
    )
    student_loader: str = Field(
        default="serving.classify.student:load_student",
        description="module:function that loads, validates and calibrates a student version "
        "(the seam for other model formats)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: PositiveInt | None = Field(
        default=None, description="torch intra-op threads per replica (Ray sets 1 otherwise)"
    )

    @model_validator(mode="after")
    def _hosts_cascades(self) -> GatewayConfig:
        if (self.student is None) != (self.teacher is None):
            given, missing = (
                ("student", "teacher") if self.teacher is None else ("teacher", "student")
            )
            raise ValueError(
                f"a classification cascade needs both student and teacher: add {missing}.path "
                f"(or leave out {given} too, to host only a generative cascade in `generate`)"
            )
        if self.student is None and self.generate is None:
            raise ValueError(
                "this config hosts no cascade: add student.path and teacher.path (a "
                "classification cascade), a `generate` section with its student.path and "
                "teacher.path (a generative cascade), or both"
            )
        generate = self.generate
        if generate is None or self.student is None:
            return self
        if generate.name == self.cascade.name:
            raise ValueError(
                f"cascade.name and generate.name are both {generate.name!r}: each cascade "
                "needs its own model id; rename one"
            )
        if generate.log.dir.resolve() == self.log.dir.resolve():
            raise ValueError(
                f"log.dir and generate.log.dir are both {str(generate.log.dir)!r}: each "
                "cascade logs into its own folder (the distillation job reads one kind)"
            )
        if generate.registry is not None and generate.registry == self.registry:
            raise ValueError(
                f"registry and generate.registry are both {generate.registry!r}: each cascade "
                "follows its own registry (a pointer names one kind's versions)"
            )
        return self

    @property
    def classify(self) -> bool:
        """Whether this gateway hosts a classification cascade."""
        return self.student is not None

    def hosted(self) -> dict[str, str]:
        """Every cascade this config hosts: its name (model id) to its kind."""
        names = {self.cascade.name: "classify"} if self.classify else {}
        if self.generate is not None:
            names[self.generate.name] = "generate"
        return names


class Pin(_Strict):
    """One cascade's part of the Gateway's ``user_config``."""

    student_version: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="A version in the registry to pin (a held rollback); without it every "
        "replica follows the registry's current pointer",
    )
    threshold: float | None = Field(
        default=None, ge=0, le=1, description="Override the version's calibrated threshold"
    )


class SwapRequest(Pin):
    """The Gateway deployment's ``user_config``: changing it swaps a student in place. The
    top-level fields are the classification cascade's; ``generate`` holds the generative
    cascade's."""

    generate: Pin = Field(
        default=Pin(), description="The generative cascade's pin and threshold override"
    )
