"""The generative cascade's configuration: one pydantic model, hung on the gateway's config.

A generative cascade is a task of its own: its student and teacher, its threshold rule, its
log folder and its registry never mix with a classification cascade's. Limits that belong
to a student version (the longest prompt, the most new tokens) come from the version's
manifest unless the config sets them (:func:`resolve_limits`).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from serving.config_sections import BatchingConfig, LogConfig
from serving.contracts import defaults
from serving.contracts.manifest import ModelManifest
from serving.contracts.storage import StoreURI
from serving.contracts.threshold import check_one_rule
from serving.generate.agreement import DEFAULT_AGREEMENT_CUT
from serving.generate.scorers import ScorerName

DEFAULT_NAME = "protege-generate"
DEFAULT_SCORER = "mean_logprob"
DEFAULT_MAX_PROMPT_TOKENS = 512
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_TOP_LOGPROBS = 8
MAX_TOP_LOGPROBS = 20  # OpenAI's own bound on top_logprobs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LanguageModelSpec(_Strict):
    path: Path = Field(description="A Hugging Face causal-LM folder (safetensors, tokenizer)")


class RemoteTeacherSpec(_Strict):
    """A teacher behind an OpenAI-compatible server (vLLM, a hosted API): it generates
    from scratch (an API offers no pass that verifies a draft)."""

    url: str = Field(
        pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="The server's base URL, ending in /v1 (http://host:8000/v1)",
    )
    model: str = Field(min_length=1, description="The model the server serves, as `model`")
    api_key_env: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="The environment variable holding its key (sent as a bearer token); "
        "unset or empty while named is an error, never an unauthenticated call",
    )
    tokenizer: Path | None = Field(
        default=None,
        description="A local folder with the served model's tokenizer: the API names tokens "
        "by text, and this maps them to ids so the log keeps the top-k (without it, "
        "records keep the teacher's text only)",
    )
    allow_plain_http: bool = Field(
        default=False,
        description="Send the key over plain http to a host other than this machine (only "
        "inside a network you trust; otherwise use https://)",
    )

    @model_validator(mode="after")
    def _no_key_in_clear(self) -> RemoteTeacherSpec:
        host = urlsplit(self.url).hostname or ""
        loopback = host in ("localhost", "::1") or host.startswith("127.")
        clear = self.url.startswith("http://") and not loopback and not self.allow_plain_http
        if self.api_key_env and clear:
            raise ValueError(
                f"the teacher's key would travel in clear text to {host}: use an https:// "
                "url, or set allow_plain_http: true inside a network you trust"
            )
        return self


class GenerateOverloadConfig(_Strict):
    teacher_max_in_flight: PositiveInt = Field(
        default=16,
        description="Escalated answers streaming from the teacher at once per replica; beyond "
        "it an escalated answer is the student's at once, marked degraded (the bulkhead)",
    )


class GenerateCascadeConfig(_Strict):
    name: str = Field(
        default=DEFAULT_NAME,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$",
        description="The model id clients send as `model` (and /v1/models lists)",
    )
    student: LanguageModelSpec
    teacher: LanguageModelSpec | RemoteTeacherSpec = Field(
        description="A causal-LM folder ({path}), or an OpenAI-compatible server "
        "({url, model, api_key_env, tokenizer})"
    )
    scorer: ScorerName = Field(
        default=DEFAULT_SCORER,
        description="A generation scorer over the student's own token log-probabilities: "
        "mean_logprob, min_logprob or low_quantile",
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
        description="Share of kept answers logged as a uniform sample (the teacher answers "
        "them offline); the gate's evidence",
    )
    agreement_cut: float = Field(
        default=DEFAULT_AGREEMENT_CUT,
        ge=0,
        le=1,
        description="A kept answer agrees with the teacher's when their ROUGE-L F1 is at "
        "least this",
    )
    max_prompt_tokens: PositiveInt | None = Field(
        default=None,
        description="The longest prompt served, in the student's tokens (longer is a 400); "
        f"None: the version's manifest, else {DEFAULT_MAX_PROMPT_TOKENS}",
    )
    max_new_tokens: PositiveInt | None = Field(
        default=None,
        description="The most new tokens an answer may have (a request's max_tokens is "
        f"clamped to it); None: the version's manifest, else {DEFAULT_MAX_NEW_TOKENS}",
    )
    top_logprobs: NonNegativeInt = Field(
        default=DEFAULT_TOP_LOGPROBS,
        le=MAX_TOP_LOGPROBS,
        description="Teacher log-probabilities logged per answer token (the top k; the "
        "distillation's soft targets)",
    )
    draft_reuse: bool = Field(
        default=True,
        description="At temperature 0 with a shared tokenizer, the teacher verifies the "
        "student's draft and generates only the rest",
    )
    teacher_timeout_s: PositiveFloat = Field(
        default=30.0,
        description="The longest the teacher may take for its first token, or between two "
        "of its steps; before its first token the student answers (degraded), after it "
        "the answer fails",
    )
    overload: GenerateOverloadConfig = GenerateOverloadConfig()
    batching: BatchingConfig = Field(
        default=BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.01),
        description="The student's static batches (answers generated together)",
    )
    teacher_batching: BatchingConfig = Field(
        default=BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.01),
        description="The teacher's static batches (one verification pass for all)",
    )
    log: LogConfig = Field(
        default=LogConfig(dir=Path("var/cache/generations")),
        description="This cascade's own log (never the classification cascade's folder)",
    )
    registry: StoreURI | None = Field(
        default=None,
        description="This cascade's model registry (a folder or s3://bucket/prefix); every "
        "replica serves its current version",
    )
    registry_cache_dir: Path = Field(
        default=Path("var/cache/generate-registry-cache"),
        description="Where a replica keeps the versions it downloads from an object store",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> GenerateCascadeConfig:
        check_one_rule(self)
        return self


def resolve_limits(
    config: GenerateCascadeConfig, manifest: ModelManifest | None, window: int | None = None
) -> tuple[int, int]:
    """(max prompt tokens, max new tokens) for one student version: the config's, else the
    manifest's, else the defaults; the prompt limit lowered so that prompt and answer fit
    the model's ``window`` (its position embeddings), which must leave room for both."""
    new = config.max_new_tokens or (manifest and manifest.max_new_tokens) or DEFAULT_MAX_NEW_TOKENS
    prompt = (
        config.max_prompt_tokens
        or (manifest and manifest.max_prompt_tokens)
        or DEFAULT_MAX_PROMPT_TOKENS
    )
    if window is not None:
        if new >= window:
            raise ValueError(
                f"max_new_tokens {new} leaves no room for a prompt in the model's window of "
                f"{window} positions: lower max_new_tokens"
            )
        prompt = min(prompt, window - new)
    return int(prompt), int(new)
