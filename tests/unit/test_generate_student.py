"""The generative cascade's config and its student loader: one threshold rule, limits from
the version's manifest, a slot that hot swaps a generative student as it does a
classifier."""

from __future__ import annotations

import pytest
import torch
from polling import wait_for
from pydantic import ValidationError
from tiny_lm import build_tiny_lm

from serving.contracts.manifest import Calibration, ModelManifest, write_manifest
from serving.generate.config import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_PROMPT_TOKENS,
    GenerateCascadeConfig,
    resolve_limits,
)
from serving.generate.student import GenerativeStudent, load_student
from serving.hot_swap import StudentSlot

PATHS = {"student": {"path": "s"}, "teacher": {"path": "t"}}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(**fields) -> GenerateCascadeConfig:
    return GenerateCascadeConfig.model_validate({**PATHS, **fields})


def manifest(version: str, **fields) -> ModelManifest:
    return ModelManifest(version=version, role="student", created_at=0.0, kind="generate", **fields)


def test_the_config_takes_one_threshold_rule_and_known_scorers():
    default = config()
    assert (default.name, default.scorer, default.top_logprobs) == (
        "protege-generate",
        "mean_logprob",
        8,
    )
    assert default.agreement_cut == 0.5 and default.draft_reuse
    assert default.log.dir.name == "generations"  # never the classification cascade's log
    with pytest.raises(ValidationError, match="at most one of"):
        config(threshold=0.5, target_agreement=0.9)
    with pytest.raises(ValidationError, match="known scorers: low_quantile, mean_logprob"):
        config(scorer="max_prob")
    with pytest.raises(ValidationError, match="extra"):
        config(max_tokens=5)
    with pytest.raises(ValidationError):
        config(top_logprobs=21)


def test_limits_come_from_the_config_else_the_manifest_else_the_defaults():
    assert resolve_limits(config(), None) == (DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_NEW_TOKENS)
    recorded = manifest("v", max_prompt_tokens=100, max_new_tokens=20)
    assert resolve_limits(config(), recorded) == (100, 20)
    assert resolve_limits(config(max_new_tokens=30), recorded) == (100, 30)
    # the prompt limit leaves the answer room in the model's window
    assert resolve_limits(config(), recorded, window=110) == (90, 20)
    with pytest.raises(ValueError, match="leaves no room"):
        resolve_limits(config(max_new_tokens=110), None, window=110)


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Two tiny student versions, the second calibrated for a target."""
    root = tmp_path_factory.mktemp("versions")
    one = build_tiny_lm(root / "one", seed=2, layers=1)
    two = build_tiny_lm(root / "two", seed=3, layers=1)
    write_manifest(one, manifest("one", max_new_tokens=6))
    calibration = Calibration(
        source="test: 4 answers",
        confidences={"mean_logprob": [0.1, 0.2, 0.3, 0.4]},
        agrees_with_teacher=[False, False, True, True],
    )
    write_manifest(
        two,
        manifest("two", max_new_tokens=5, draft_min_confidence=0.25, calibration=calibration),
    )
    return one, two


def test_the_loader_reads_limits_threshold_and_draft_cut(versions):
    one, two = versions
    active = load_student(one, config(threshold=0.4), "cpu")
    student = active.model
    assert isinstance(student, GenerativeStudent)
    assert (student.version, student.max_new_tokens, active.rule.value) == ("one", 6, 0.4)
    assert student.max_prompt_tokens == 256 - 6  # the tiny model's window
    assert student.draft_min_confidence is None and len(student.tokenizer_digest) == 16
    calibrated = load_student(two, config(target_escalation_rate=0.5), "cpu")
    assert calibrated.rule.value == pytest.approx(0.3)  # escalates the lower half
    assert calibrated.model.draft_min_confidence == 0.25
    with pytest.raises(ValueError, match="no threshold"):
        load_student(one, config(), "cpu")  # no rule and no default target


def test_the_loader_refuses_a_classification_version(tmp_path):
    folder = build_tiny_lm(tmp_path / "lm", seed=2, layers=1)
    write_manifest(folder, manifest("c").model_copy(update={"kind": "classify"}))
    with pytest.raises(ValueError, match="classify model, not a generative one"):
        load_student(folder, config(threshold=0.5), "cpu")


def test_the_slot_hot_swaps_a_generative_student(versions):
    one, two = versions
    cascade = config(target_agreement=0.9)
    initial = load_student(
        one, cascade.model_copy(update={"target_agreement": None, "threshold": 0.2}), "cpu"
    )
    slot = StudentSlot(initial, cascade, "cpu", None, loader=load_student)  # type: ignore[arg-type]
    assert slot.request("two", two)
    wait_for(lambda: slot.stats.loading is None, timeout_s=60.0, every_s=0.01)
    assert slot.active.version == "two" and slot.stats.swaps == 1
    assert slot.active.rule.value == pytest.approx(0.3)  # calibrated for agreement 0.9
    # a threshold override for the serving version applies in place, with no load
    assert slot.request("two", two, threshold=0.05)
    assert slot.active.rule.value == 0.05 and slot.active.model is not initial.model
