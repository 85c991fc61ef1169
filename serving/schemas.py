"""Wire types of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

Tier = Literal["student", "teacher"]


class ClassifyRequest(BaseModel):
    """Size limits are checked by the gateway, which knows the configured maximums."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[StrictStr] = Field(description="Texts to classify; a single string is accepted")
    threshold: float | None = Field(
        default=None, ge=0, le=1, description="Override the escalation threshold for this request"
    )
    force_tier: Tier | None = Field(
        default=None,
        description="Answer every input with this tier ('teacher' is logged as forced)",
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


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


class ModelsResponse(BaseModel):
    student: ModelInfo
    teacher: ModelInfo
    scorer: str
    threshold: float
    threshold_rule: str
    audit_fraction: float
    swap: SwapStatus
