"""A generative cascade's distillation config (``kind: generate`` in the distillation
YAML), validated with pydantic: what differs from a classification job's
(:class:`distill.config.DistillConfig`), which shares its registry, log, evaluation and gate
sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt

from distill.config import EvalConfig, GateConfig
from serving.contracts.storage import StoreURI, is_remote
from serving.generate.agreement import DEFAULT_AGREEMENT_CUT
from serving.generate.scorers import ScorerName


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenLossConfig(_Strict):
    alpha: float = Field(
        default=0.5, ge=0, le=1, description="Weight of the KL term (token distillation)"
    )
    temperature: PositiveFloat = Field(
        default=1.0, description="Softens the logged top-k and the student's distribution"
    )


class CausalTrainConfig(_Strict):
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 8
    lr: PositiveFloat = 1e-4
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_fraction: float = Field(default=0.1, ge=0, le=1)
    train_embeddings: bool = Field(
        default=False, description="False: the (tied) embedding and LM head stay frozen"
    )
    seed: int = 0
    workers: PositiveInt = Field(default=1, description=">1 trains under Ray Train's TorchTrainer")
    storage_path: str | None = Field(
        default=None,
        description="Where Ray Train keeps its checkpoints with workers > 1: a folder or URI "
        "every node reaches (default <registry>/train-runs)",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class GenerateDistillConfig(_Strict):
    kind: Literal["generate"]
    registry: StoreURI = Field(description="The generative cascade's registry")
    log_dir: StoreURI = Field(description="The generative cascade's log (or where it ships)")
    s3_endpoint: str | None = None
    work_dir: Path = Path("var/cache/distill-work")
    teacher: Path = Field(description="The teacher's causal-LM folder (answers offline)")
    teacher_version: str | None = Field(
        default=None,
        description="The version the gateway's teacher logs its answers under, when it is "
        "not this folder's (a remote teacher logs its model name): those logged answers "
        "then train as they are; None: the folder's own version",
    )
    traffic: Path | None = Field(
        default=None,
        description="The task's prompts (`protege init` writes them): the calibration fallback",
    )
    gold: Path | None = Field(default=None, description="Prompts with a `reference` answer")
    traffic_limit: PositiveInt = Field(
        default=200,
        description="Traffic prompts the judge answers when it calibrates on them (a seeded "
        "sample: every student answers each, and generation is slow)",
    )
    gold_limit: PositiveInt = Field(
        default=100, description="Gold prompts the judge answers (a seeded sample)"
    )
    cache_dir: Path | None = None
    scorer: ScorerName = Field(default="mean_logprob", description="The scorer serving uses")
    agreement_cut: float = Field(default=DEFAULT_AGREEMENT_CUT, ge=0, le=1)
    distillation: Literal["token", "sequence"] = "token"
    max_prompt_tokens: PositiveInt = 512
    max_new_tokens: PositiveInt = 64
    top_k: PositiveInt = Field(default=8, description="Top-k of offline teacher answers")
    batch_size: PositiveInt = Field(default=8, description="Prompts generated together")
    min_records: NonNegativeInt = Field(default=50, description="Fewer new records: nothing to do")
    replay_records: NonNegativeInt = Field(
        default=200, description="Sample of consumed training records replayed"
    )
    loss: TokenLossConfig = TokenLossConfig()
    train: CausalTrainConfig = CausalTrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    pushgateway: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def scores_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir
        return (
            self.work_dir / "scores" if is_remote(self.registry) else Path(self.registry) / "cache"
        )
