"""A task definition: the teacher, the seed student and a sample of the user's traffic.

    name: support-tickets
    teacher: models/ticket-teacher       # any HF sequence-classification folder
    student: models/ticket-student       # the seed student, same labels in the same order
    traffic: data/traffic.jsonl          # unlabeled, a `text` column (JSONL, CSV or Parquet)
    gold: data/gold.csv                  # optional: `text`, `label`

A generative task says ``kind: generate``: two causal-LM folders, traffic with a ``prompt``
(a completion) or ``messages`` (a chat) column, an optional gold file with a ``reference``
column, ``agreement_cut`` and ``distillation: token | sequence``
(:class:`GenerateTaskSpec`). ``kind`` defaults to ``classify``.

Labels come from the teacher's ``id2label``. Relative paths are read from the task file's
folder (``workdir``, when not given, is ``var/tasks/<name>`` under the current folder).
Everything else has a default (``serving.contracts.defaults``). ``protege init TASK.yaml``
checks the pair, calibrates the seed student on the traffic sample and writes what
serving and distillation need into ``workdir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
)

from serving.classify.scorers import SCORERS, ScorerName
from serving.contracts import defaults
from serving.generate import scorers as generation_scorers
from serving.generate.agreement import DEFAULT_AGREEMENT_CUT


class TaskError(ValueError):
    """A task that cannot run; the one-line message names the file or field and the fix."""


class _Task(BaseModel):
    """What every kind of task holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Task name")
    teacher: Path = Field(description="The teacher's model folder (safetensors)")
    student: Path = Field(description="The seed student's model folder")
    traffic: Path = Field(description="Unlabeled sample of the traffic (JSONL, CSV, Parquet)")
    gold: Path | None = Field(default=None, description="Optional gold answers")
    workdir: Path | None = Field(default=None, description="Default: var/tasks/<name>")
    registry: Path | None = Field(default=None, description="Default: <workdir>/registry")
    log_dir: Path | None = Field(default=None, description="Default: <workdir>/escalations")
    target_agreement: float = Field(default=defaults.TARGET_AGREEMENT, gt=0, le=1)
    audit_fraction: float = Field(default=defaults.AUDIT_FRACTION, ge=0, le=1)

    @property
    def work(self) -> Path:
        return self.workdir or Path("var/tasks") / self.name

    @property
    def registry_dir(self) -> Path:
        return self.registry or self.work / "registry"

    @property
    def escalations_dir(self) -> Path:
        return self.log_dir or self.work / "escalations"


class TaskSpec(_Task):
    """A classification task."""

    kind: Literal["classify"] = "classify"
    teacher: Path = Field(description="Teacher folder: a HF sequence classifier (safetensors)")
    student: Path = Field(description="Seed student folder, the teacher's labels in order")
    gold: Path | None = Field(default=None, description="Optional gold labels (text, label)")
    replay_examples: Path | None = Field(
        default=None, description="Optional labelled examples replayed by every distillation run"
    )
    text_column: str = "text"
    label_column: str = "label"
    scorer: ScorerName = Field(default=defaults.SCORER, description=f"One of {sorted(SCORERS)}")
    max_tokens: PositiveInt = defaults.MAX_TOKENS
    traffic_limit: PositiveInt = Field(
        default=5000, description="Score at most this many traffic texts (a seeded sample)"
    )


class GenerateTaskSpec(_Task):
    """A generative task: two causal LMs (safetensors, tokenizers with a chat template)."""

    kind: Literal["generate"]
    gold: Path | None = Field(
        default=None, description="Optional gold answers: prompt or messages, and reference"
    )
    prompt_column: str = Field(default="prompt", description="A completion prompt (text)")
    messages_column: str = Field(default="messages", description="A chat (JSONL: a list)")
    reference_column: str = Field(default="reference", description="The gold answer")
    scorer: generation_scorers.ScorerName = Field(
        default="mean_logprob", description=f"One of {sorted(generation_scorers.SCORERS)}"
    )
    agreement_cut: float = Field(
        default=DEFAULT_AGREEMENT_CUT,
        ge=0,
        le=1,
        description="A student answer agrees with the teacher's at ROUGE-L F1 >= this",
    )
    distillation: Literal["token", "sequence"] = Field(
        default="token",
        description="token: the teacher's logged top-k (needs one tokenizer for both); "
        "sequence: its text only (any two tokenizers)",
    )
    max_prompt_tokens: PositiveInt = 512
    max_new_tokens: PositiveInt = 64
    traffic_limit: PositiveInt = Field(
        default=200, description="Answer at most this many traffic prompts (a seeded sample)"
    )
    gold_limit: PositiveInt = Field(
        default=100, description="Answer at most this many gold prompts (a seeded sample)"
    )
    batch_size: PositiveInt = Field(default=8, description="Prompts generated together")


AnyTask = TaskSpec | GenerateTaskSpec
KINDS: dict[str, type[TaskSpec] | type[GenerateTaskSpec]] = {
    "classify": TaskSpec,
    "generate": GenerateTaskSpec,
}


def load_task(path: Path) -> AnyTask:
    """Read and validate a task file; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected a mapping of fields (name, teacher, student, traffic)")
    kind = raw.get("kind", "classify")
    if kind not in KINDS:
        raise TaskError(f"{path}: field 'kind': {kind!r} is not one of {sorted(KINDS)}")
    try:
        spec: AnyTask = KINDS[kind].model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(file)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise TaskError(f"{path}: field {field!r}: {first['msg']}{more}") from None
    return _resolve(spec, path.parent)


def _resolve(spec: AnyTask, base: Path) -> AnyTask:
    fields = ["teacher", "student", "traffic", "gold"]
    fields += ["replay_examples"] if isinstance(spec, TaskSpec) else []
    fields += ["workdir", "registry", "log_dir"]
    update = {}
    for name in fields:
        value = getattr(spec, name)
        if value is not None and not Path(value).is_absolute():
            update[name] = base / value
    return spec.model_copy(update=update)
