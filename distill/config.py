"""The distillation job's configuration (``deploy/distill.yaml``), validated with pydantic.

Every default lives here; the YAML names only what a deployment changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LossConfig(_Strict):
    temperature: PositiveFloat = Field(default=2.0, description="Softens both distributions")
    alpha: float = Field(default=0.7, ge=0, le=1, description="Weight of the soft (KL) term")


class TrainConfig(_Strict):
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 16
    lr_encoder: PositiveFloat = 3e-5
    lr_head: PositiveFloat = 1e-3
    max_tokens: PositiveInt = 64
    seed: int = 0
    workers: PositiveInt = Field(default=1, description=">1 trains under Ray Train's TorchTrainer")


class ReplayConfig(_Strict):
    earlier_records: NonNegativeInt = Field(default=1000, description="Sample of consumed records")
    seed_examples: bool = Field(default=True, description="Replay the seed headlines (gold labels)")


class GateConfig(_Strict):
    target_agreement: float = Field(
        default=0.97, ge=0, le=1, description="Each model's threshold is calibrated for this"
    )
    min_rate_drop: float = Field(
        default=0.01, ge=0, le=1, description="Escalation-rate drop needed to promote"
    )
    accuracy_tolerance: float = Field(
        default=0.005, ge=0, le=1, description="Cascade accuracy the candidate may lose"
    )


class DistillConfig(_Strict):
    registry: Path = Field(description="Model registry folder (versions, current pointer, runs)")
    log_dir: Path = Field(description="The gateway's escalation log folder")
    data_dir: Path = Field(description="BBC splits written by `protege models build`")
    teacher: Path = Field(description="Teacher model folder (scores replay and evaluation data)")
    min_records: NonNegativeInt = Field(default=50, description="Fewer new records: nothing to do")
    holdout_sentences: NonNegativeInt = Field(default=2000, description="Evaluation traffic size")
    calibration_size: PositiveInt = Field(
        default=3000, description="Inputs each version's threshold is calibrated on"
    )
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    replay: ReplayConfig = ReplayConfig()
    gate: GateConfig = GateConfig()
    pushgateway: str | None = Field(
        default=None, description="host:port of a Prometheus Pushgateway for the job's metrics"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"


def load_distill_config(path: Path, **overrides: object) -> DistillConfig:
    """Read and validate the YAML; relative paths resolve against the working directory."""
    if not Path(path).exists():
        raise FileNotFoundError(f"distillation config {path} not found")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DistillConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"invalid distillation config {path}:\n{exc}") from None
