"""The distillation job's configuration (``deploy/distill.yaml``), validated with pydantic.

Every default lives here; the YAML names only what a deployment changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from serving.classify.scorers import ScorerName
from serving.contracts import defaults
from serving.contracts.storage import StoreURI, is_remote

if TYPE_CHECKING:
    from distill.generate_config import GenerateDistillConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LossConfig(_Strict):
    temperature: PositiveFloat = Field(
        default=defaults.TEMPERATURE, description="Softens both distributions"
    )
    alpha: float = Field(
        default=defaults.ALPHA, ge=0, le=1, description="Weight of the soft (KL) term"
    )


class TrainConfig(_Strict):
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 16
    lr_encoder: PositiveFloat = 3e-5
    lr_head: PositiveFloat = 1e-3
    max_tokens: PositiveInt = Field(
        default=defaults.MAX_TOKENS, description="As in calibration and serving"
    )
    seed: int = 0
    workers: PositiveInt = Field(default=1, description=">1 trains under Ray Train's TorchTrainer")
    storage_path: str | None = Field(
        default=None,
        description="Where Ray Train keeps its checkpoints with workers > 1: a folder or URI "
        "every node reaches (default <registry>/train-runs)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How Ray places the workers: PACK fills a node first, STRICT_SPREAD puts "
        "each on its own node",
    )


class ReplayConfig(_Strict):
    earlier_records: NonNegativeInt = Field(
        default=1000, description="Sample of consumed training records"
    )
    examples: Path | None = Field(
        default=None,
        description="Labelled examples (text, label) replayed every run, e.g. the seed "
        "student's training set, so it does not forget what the traffic no longer shows",
    )


class EvalConfig(_Strict):
    share: float = Field(
        default=defaults.EVAL_SHARE,
        gt=0,
        lt=1,
        description="Share of logged texts (by hash) that evaluate and never train; half "
        "calibrate thresholds, half judge the candidate",
    )
    max_records: PositiveInt = Field(
        default=50_000, description="Pool at most this many of the newest evaluation records"
    )
    min_calibration_sampled: NonNegativeInt = Field(
        default=200,
        description="Fewer sampled records in the calibration split: calibrate on the "
        "task's traffic sample instead",
    )


class GateConfig(_Strict):
    target_agreement: float = Field(
        default=defaults.TARGET_AGREEMENT,
        ge=0,
        le=1,
        description="Each model's threshold is calibrated for this agreement with the teacher",
    )
    confidence: float = Field(
        default=defaults.CONFIDENCE, gt=0.5, lt=1, description="One-sided confidence of the gate"
    )
    min_drop: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="The one-sided lower bound of the drop in escalation needed for the "
        "target agreement must exceed min(min_drop, min_relative_drop x the current's)",
    )
    min_relative_drop: float = Field(
        default=0.10,
        ge=0,
        le=1,
        description="The drop required as a share of what the current student needs, when "
        "that is smaller than min_drop (a student near zero escalation can be replaced)",
    )
    agreement_margin: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Refuse a candidate whose cascade agreement at the threshold it would "
        "serve with has a one-sided upper bound below target_agreement minus this",
    )
    gold_margin: float = Field(
        default=0.02, ge=0, le=1, description="Cascade gold accuracy the candidate may lose"
    )
    min_sampled: NonNegativeInt = Field(
        default=100, description="Fewer sampled confident gate records: not enough evidence"
    )
    min_requests: NonNegativeInt = Field(
        default=20,
        description="Fewer requests holding those sampled records: not enough evidence (the "
        "bootstrap resamples requests; a handful of them gives an interval of no width)",
    )
    bootstrap_draws: PositiveInt = 1000
    seed: int = 0


class DistillConfig(_Strict):
    registry: StoreURI = Field(
        description="Model registry: a folder or s3://bucket/prefix (versions, pointer, runs)"
    )
    log_dir: StoreURI = Field(
        description="The escalation log: the gateway's log folder, or where it ships "
        "segments (log.ship_to: a shared folder or s3://bucket/prefix)"
    )
    s3_endpoint: str | None = Field(
        default=None,
        description="The S3-compatible endpoint for s3:// URIs (default $AWS_ENDPOINT_URL; "
        "credentials from the AWS environment variables)",
    )
    work_dir: Path = Field(
        default=Path("var/cache/distill-work"),
        description="Local scratch: downloaded log segments and versions of an object store",
    )
    teacher: Path = Field(description="Teacher model folder (labels records offline)")
    traffic: Path | None = Field(
        default=None,
        description="The task's traffic sample (a text column): the calibration fallback",
    )
    gold: Path | None = Field(
        default=None, description="Gold labels (text, label): gold accuracy beside the estimates"
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Score cache (default: <registry>/cache, or <work_dir>/scores for an "
        "object-store registry)",
    )
    scorer: ScorerName = Field(default=defaults.SCORER, description="The scorer serving uses")
    min_records: NonNegativeInt = Field(default=50, description="Fewer new records: nothing to do")
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    replay: ReplayConfig = ReplayConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    pushgateway: str | None = Field(
        default=None, description="host:port of a Prometheus Pushgateway for the job's metrics"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runtime: Literal["torch", "onnx"] = Field(
        default="torch",
        description="How candidates are served on CPU, and so judged and calibrated: onnx "
        "runs the float graph exported from their weights on ONNX Runtime (same answers to "
        "about 1e-6, less overhead per call); the version id ends in -onnx",
    )

    @property
    def scores_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        return (
            self.work_dir / "scores" if is_remote(self.registry) else Path(self.registry) / "cache"
        )


def load_classify_config(path: Path, **overrides: object) -> DistillConfig:
    """:func:`load_distill_config` where only a classification job will do."""
    config = load_distill_config(path, **overrides)
    if not isinstance(config, DistillConfig):
        raise ValueError(f"{path} configures a generative cascade's job, not a classification one")
    return config


def load_distill_config(path: Path, **overrides: object) -> DistillConfig | GenerateDistillConfig:
    """Read and validate the YAML (``kind: generate`` is a generative cascade's job);
    relative paths resolve against the working directory."""
    from distill.generate_config import GenerateDistillConfig

    if not Path(path).exists():
        raise FileNotFoundError(f"distillation config {path} not found")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    kind = raw.get("kind", "classify")
    try:
        if kind == "generate":
            return GenerateDistillConfig.model_validate(raw)
        if kind != "classify":
            raise ValueError(f"kind {kind!r} is not one of classify, generate")
        return DistillConfig.model_validate({k: v for k, v in raw.items() if k != "kind"})
    except ValidationError as exc:
        raise ValueError(f"invalid distillation config {path}:\n{exc}") from None
