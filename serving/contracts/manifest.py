"""The ``protege.json`` manifest that travels inside a model folder.

A model folder is a plain Hugging Face classifier folder (config, safetensors, tokenizer).
protege adds one file: the version id, the role, and the calibration scores from which
any threshold target (escalation rate or agreement with the teacher) can be derived for
that exact version. A folder without a manifest still serves: its version is the hash of
its weights and its threshold must then be given in the config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.contracts.threshold import threshold_for_agreement, threshold_for_rate

MANIFEST_NAME = "protege.json"
MANIFEST_SCHEMA_VERSION = 1


class Calibration(BaseModel):
    """Per-input confidences of a student (one list per scorer) and its agreement with the
    teacher on the same calibration traffic, with each input's weight: the inverse of the
    probability with which it was logged, so a weighted threshold stands for the whole
    live traffic. Serving derives the threshold from exactly these numbers."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="What traffic was scored, e.g. 'calibration: 4000 inputs'")
    kind: Literal["live_traffic", "traffic_sample"] = Field(
        default="traffic_sample",
        description="live_traffic: weighted records of the escalation log's calibration "
        "split; traffic_sample: the task's traffic file (unit weights)",
    )
    confidences: dict[str, list[float]]
    agrees_with_teacher: list[bool]
    weights: list[float] | None = Field(
        default=None, description="One per input (1 / inclusion probability); None: all 1"
    )

    @model_validator(mode="after")
    def _same_length(self) -> Calibration:
        n = len(self.agrees_with_teacher)
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"calibration weights: {len(self.weights)} values, {n} flags")
        for name, scores in self.confidences.items():
            if len(scores) != n:
                raise ValueError(
                    f"calibration scores for {name!r}: {len(scores)} values, {n} flags"
                )
        return self

    def threshold(
        self,
        scorer: str,
        *,
        target_escalation_rate: float | None = None,
        target_agreement: float | None = None,
    ) -> float:
        """The threshold of this version for one target (exactly one must be given)."""
        if (target_escalation_rate is None) == (target_agreement is None):
            raise ValueError("give exactly one of target_escalation_rate, target_agreement")
        if scorer not in self.confidences:
            raise ValueError(f"no calibration scores for scorer {scorer!r}")
        scores = self.confidences[scorer]
        if target_escalation_rate is not None:
            return threshold_for_rate(scores, target_escalation_rate, self.weights)
        assert target_agreement is not None
        return threshold_for_agreement(
            scores, self.agrees_with_teacher, target_agreement, self.weights
        )


def make_calibration(
    confidences: Mapping[str, Sequence[float] | np.ndarray],
    agrees: Sequence[bool] | np.ndarray,
    source: str,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    kind: str = "traffic_sample",
) -> Calibration:
    """A version's calibration from per-record figures: its confidence under every scorer,
    whether its answer agrees with the teacher's, and each record's weight (any kind)."""
    return Calibration(
        source=source,
        kind=kind,  # type: ignore[arg-type]
        confidences={
            name: [round(float(c), 6) for c in values] for name, values in confidences.items()
        },
        agrees_with_teacher=[bool(a) for a in agrees],
        weights=None if weights is None else [round(float(w), 6) for w in weights],
    )


class DefaultTarget(BaseModel):
    """The threshold target recorded with a version, used when the config gives none."""

    model_config = ConfigDict(extra="forbid")

    target_escalation_rate: float | None = Field(default=None, ge=0, le=1)
    target_agreement: float | None = Field(default=None, ge=0, le=1)


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    version: str
    role: str = Field(description="'student' or 'teacher'")
    parent: str | None = None
    created_at: float
    kind: Literal["classify", "generate"] = Field(
        default="classify", description="The task kind: a label per input, or generated text"
    )
    labels: list[str] = Field(default_factory=list, description="classify: the label set")
    agreement_cut: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="generate: a kept answer agrees with the teacher's when their ROUGE-L F1 "
        "is at least this",
    )
    max_prompt_tokens: int | None = Field(
        default=None, gt=0, description="generate: the longest prompt served (longer is a 400)"
    )
    max_new_tokens: int | None = Field(
        default=None, gt=0, description="generate: the most new tokens an answer may have"
    )
    draft_min_confidence: float | None = Field(
        default=None,
        description="generate: below this confidence the teacher ignores the student's draft "
        "(measured on the calibration data: such drafts are mostly rejected, costing more "
        "than none); None: always verify the draft",
    )
    max_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Tokens this version was trained and calibrated at, and so is served at "
        "(None: the config's max_tokens)",
    )
    runtime: Literal["torch", "onnx", "onnx-int8"] = Field(
        default="torch",
        description="How the version is served on CPU: eager PyTorch, or ONNX Runtime on a "
        "graph exported from the weights at load (float, or int8 weights); see "
        "`protege optimize`",
    )
    default_target: DefaultTarget | None = None
    calibration: Calibration | None = None
    recalibrated_from: str | None = Field(
        default=None,
        description="The version whose weights this one serves with a new calibration, "
        "published because the served agreement had drifted from the target",
    )
    recalibration: dict[str, Any] | None = Field(
        default=None, description="The evidence of that drift: the interval that left the target"
    )
    eval: dict[str, float] = Field(default_factory=dict)
    training: dict[str, Any] = Field(
        default_factory=dict, description="Data window, record counts, loss and train settings"
    )


def weights_digest(folder: Path) -> str:
    """A short content address of a folder's safetensors weights."""
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    for path in files:
        with open(path, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):  # type: ignore[misc]
                digest.update(chunk)
    return digest.hexdigest()[:12]


def read_manifest(folder: Path) -> ModelManifest | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    return ModelManifest.model_validate_json(path.read_text())


def write_manifest(folder: Path, manifest: ModelManifest) -> None:
    """Write then rename, so a reader never sees half a manifest."""
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(), indent=1))
    tmp.replace(path)
