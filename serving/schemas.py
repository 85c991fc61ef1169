"""Wire types of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictStr,
    StringConstraints,
    Tag,
    create_model,
)

Tier = Literal["student", "teacher"]
NOT_BLANK = r"\S"  # at least one character that is not whitespace
MANY, ONE = "texts", "text"  # the two shapes of ``inputs`` (their tags in error locations)
MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
"""What a cascade's name (its model id on ``/v1/models``) may be."""
CLASSIFY_CASCADE = "protege-classify"
"""The classification cascade's name unless ``cascade.name`` says otherwise."""


class ClassifyRequest(BaseModel):
    """The request body; :func:`request_model` gives the one a gateway serves, whose schema
    carries its configured limits."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[StrictStr] | StrictStr = Field(
        description="Texts to classify; a single string is accepted"
    )
    threshold: StrictFloat | None = Field(
        default=None, ge=0, le=1, description="Override the escalation threshold for this request"
    )
    force_tier: Tier | None = Field(
        default=None,
        description="Answer every input with this tier ('teacher' is logged as forced)",
    )
    model: StrictStr | None = Field(
        default=None,
        pattern=MODEL_ID,
        description="The classification cascade to ask (an id from GET /v1/models); one this "
        "gateway does not host is a 404. Without it, the gateway's classification cascade",
    )

    @property
    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)

    @property
    def overrides(self) -> list[str]:
        """The routing overrides this request uses (refused unless the caller may steer)."""
        return [f for f in ("force_tier", "threshold") if getattr(self, f) is not None]


def request_model(max_inputs: int, max_chars: int) -> type[ClassifyRequest]:
    """The request body with the limits in its schema: 1 to ``max_inputs`` texts of 1 to
    ``max_chars`` characters, none blank."""
    text = Annotated[
        StrictStr, StringConstraints(min_length=1, max_length=max_chars, pattern=NOT_BLANK)
    ]
    many = Annotated[list[text], Field(min_length=1, max_length=max_inputs)]
    inputs = Annotated[
        Annotated[many, Tag(MANY)] | Annotated[text, Tag(ONE)],
        Discriminator(lambda v: ONE if isinstance(v, str) else MANY),
        Field(
            description=f"Texts to classify (1 to {max_inputs}, each 1 to {max_chars} "
            "characters, not only whitespace); a single string is accepted"
        ),
    ]
    return create_model("ClassifyRequest", __base__=ClassifyRequest, inputs=(inputs, ...))


class ErrorBody(BaseModel):
    """Every 4xx and 503 answer of the gateway."""

    error: str = Field(description="What was wrong and what to change")


class ClassifyOutput(BaseModel):
    label: str
    probabilities: dict[str, float]
    confidence: float = Field(description="The student's confidence under the configured scorer")
    tier: Tier
    model_version: str
    escalated: bool
    degraded: bool = Field(default=False, description="The teacher failed: the student answered")
    truncated: bool = Field(default=False, description="Input exceeded the model window")


class ClassifyResponse(BaseModel):
    request_id: str
    outputs: list[ClassifyOutput]
    logged: bool | None = Field(
        default=None,
        description="Whether this request's escalation-log records were written (false: the "
        "log could not be written, the answers stand; null: nothing to log)",
    )


class VersionInfo(BaseModel):
    """A served model of any kind; no file-system path is shown."""

    version: str


class ModelInfo(VersionInfo):
    """A served classification model."""

    labels: list[str]
    max_tokens: int


class SwapStatus(BaseModel):
    loading: str | None = Field(description="A version loading in the background, if any")
    swaps: int
    failures: int
    superseded: int = Field(description="Loads discarded because a later request came in")
    last_error: str | None
    last_swap_seconds: float | None
    following: str = Field(description="What this replica serves: the registry's pointer or a pin")
    pointer: str | None = Field(
        default=None, description="The registry's current version as this replica last read it"
    )


class CascadeInfo(BaseModel):
    """What every cascade's entry on ``/v1/models`` says, whatever its kind; each kind
    narrows ``kind``, ``student`` and ``teacher`` and adds its own fields."""

    kind: str = Field(description="classify or generate: the routes that serve the cascade")
    student: VersionInfo
    teacher: VersionInfo
    scorer: str
    threshold: float
    threshold_rule: str
    audit_fraction: float
    swap: SwapStatus


class ClassifyCascadeInfo(CascadeInfo):
    """A classification cascade (``POST /v1/classify``)."""

    kind: Literal["classify"] = "classify"
    student: ModelInfo
    teacher: ModelInfo


class GenerateCascadeInfo(CascadeInfo):
    """A generative cascade (``POST /v1/chat/completions``, ``POST /v1/completions``)."""

    kind: Literal["generate"] = "generate"
    student: VersionInfo
    teacher: VersionInfo
    agreement_cut: float = Field(
        description="A kept answer agrees with the teacher's when their ROUGE-L F1 is at least this"
    )
    max_prompt_tokens: int = Field(description="The longest prompt served (longer is a 400)")
    max_new_tokens: int = Field(description="The most new tokens an answer may have")


CascadeKindInfo = Annotated[ClassifyCascadeInfo | GenerateCascadeInfo, Field(discriminator="kind")]
"""protege's own fields of a ``/v1/models`` entry: the common part and its kind's."""


class ModelEntry(BaseModel):
    """One cascade the gateway hosts, as an OpenAI model object with protege's fields inside."""

    id: str = Field(description="The cascade's name: the `model` a request names")
    object: Literal["model"] = "model"
    created: int = Field(
        description="Unix seconds: when the served student version was made (its manifest), "
        "else when the replica started"
    )
    owned_by: str = "protege"
    protege: CascadeKindInfo


class ModelList(BaseModel):
    """``GET /v1/models`` in OpenAI's list shape: every cascade the gateway hosts."""

    object: Literal["list"] = "list"
    data: list[ModelEntry]

    def entry(self, name: str) -> ModelEntry:
        """The entry of cascade ``name``; a LookupError naming the hosted ones otherwise."""
        for entry in self.data:
            if entry.id == name:
                return entry
        hosted = ", ".join(e.id for e in self.data) or "none"
        raise LookupError(f"no cascade named {name!r} here; hosted: {hosted}")


class OpenAIError(BaseModel):
    message: str = Field(description="What was wrong and what to change")
    type: str = Field(
        description="invalid_request_error, authentication_error, permission_error or server_error"
    )
    param: str | None = Field(default=None, description="The request field at fault, if one")
    code: str | None = Field(default=None, description="A stable machine-readable reason")


class OpenAIErrorBody(BaseModel):
    """Every error the gateway writes on its OpenAI-compatible routes, in OpenAI's shape
    (which OpenAI's clients read)."""

    error: OpenAIError
