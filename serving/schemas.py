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


class ModelInfo(BaseModel):
    """A served model; no file-system path is shown."""

    version: str
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


class ModelsResponse(BaseModel):
    student: ModelInfo
    teacher: ModelInfo
    scorer: str
    threshold: float
    threshold_rule: str
    audit_fraction: float
    swap: SwapStatus
