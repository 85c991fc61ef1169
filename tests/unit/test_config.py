import time

import pytest
from pydantic import ValidationError

from serving.app import ConfigError, check_models, load_config
from serving.config import CascadeConfig, GatewayConfig
from serving.contracts import defaults
from serving.contracts.manifest import Calibration, DefaultTarget, ModelManifest
from serving.contracts.threshold import resolve_threshold


def config(student, teacher, **cascade) -> dict:
    return {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "cascade": cascade,
    }


def test_defaults_fill_everything_but_the_models(tmp_path):
    cfg = GatewayConfig.model_validate(
        {"student": {"path": tmp_path}, "teacher": {"path": tmp_path}}
    )
    assert cfg.cascade.scorer == defaults.SCORER and cfg.limits.max_inputs == 64
    assert cfg.cascade.audit_fraction == defaults.AUDIT_FRACTION
    assert cfg.student.max_tokens == cfg.teacher.max_tokens == defaults.MAX_TOKENS


def test_unknown_scorer_names_the_known_ones():
    with pytest.raises(
        ValidationError, match="unknown scorer 'vibes'; known scorers: margin, max_prob"
    ):
        CascadeConfig(scorer="vibes")


def test_out_of_range_values_carry_the_value():
    with pytest.raises(ValidationError) as info:
        CascadeConfig(threshold=1.5)
    assert "threshold" in str(info.value) and "1.5" in str(info.value)
    with pytest.raises(ValidationError, match="audit_fraction"):
        CascadeConfig(audit_fraction=-0.1)


def test_two_threshold_rules_are_refused_with_both_values():
    with pytest.raises(
        ValidationError,
        match=r"at most one of .* got \{'threshold': 0.5, 'target_agreement': 0\.9\}",
    ):
        CascadeConfig(threshold=0.5, target_agreement=0.9)


@pytest.mark.parametrize("name", ["protege-classify", "bbc:v2", "a", "A" * 64, "x.y_z-1"])
def test_a_cascade_name_is_a_model_id(name):
    assert CascadeConfig(name=name).name == name


@pytest.mark.parametrize("name", ["", "-lead", "A" * 65, "two words", "ok\n", "a/b"])
def test_a_name_that_is_not_a_model_id_is_refused_with_the_rule(name):
    with pytest.raises(ValidationError, match="is not a model id: start with a letter or digit"):
        CascadeConfig(name=name)


def test_the_classification_cascade_is_named_by_default():
    assert CascadeConfig().name == "protege-classify"


def test_unknown_field_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="treshold"):
        load_config(config(tmp_path, tmp_path, treshold=0.5))


def test_missing_model_folder_says_how_to_build(tmp_path, tiny_pair):
    with pytest.raises(ConfigError, match="protege models build"):
        check_models(load_config(config(tmp_path / "nope", tiny_pair[1], threshold=0.5)))


def test_no_threshold_and_no_calibration_is_refused(tiny_pair):
    with pytest.raises(ConfigError, match=r"set cascade\.threshold"):
        check_models(load_config(config(*tiny_pair)))


def test_labels_must_match(tmp_path, tiny_pair):
    from tiny_models import build_tiny
    from transformers import AutoConfig

    other = build_tiny(tmp_path / "other", seed=3, mean_pool=False)
    cfg = AutoConfig.from_pretrained(other)
    cfg.id2label = {0: "x", 1: "y", 2: "z", 3: "w", 4: "v"}
    cfg.save_pretrained(other)
    with pytest.raises(ConfigError, match="differ from teacher labels"):
        check_models(load_config(config(tiny_pair[0], other, threshold=0.5)))


def test_a_gateway_without_a_key_is_refused_before_deploying(tiny_pair, monkeypatch):
    monkeypatch.delenv("PROTEGE_API_KEYS", raising=False)
    with pytest.raises(ConfigError, match="no API key configured"):
        check_models(load_config(config(*tiny_pair, threshold=0.5)))
    monkeypatch.setenv("PROTEGE_API_KEYS", "[]")
    with pytest.raises(ConfigError, match=r"\$PROTEGE_API_KEYS holds no API key"):
        check_models(
            load_config({**config(*tiny_pair, threshold=0.5), "access": {"required": False}})
        )
    monkeypatch.delenv("PROTEGE_API_KEYS")
    check_models(load_config({**config(*tiny_pair, threshold=0.5), "access": {"required": False}}))


def manifest(default: DefaultTarget | None = None) -> ModelManifest:
    scores = [i / 100 for i in range(100)]
    return ModelManifest(
        version="s1",
        role="student",
        created_at=time.time(),
        labels=["a", "b"],
        default_target=default,
        calibration=Calibration(
            source="test",
            confidences={"max_prob": scores},
            agrees_with_teacher=[s >= 0.3 for s in scores],
        ),
    )


def test_threshold_rules_resolve_against_the_versions_calibration():
    m = manifest(DefaultTarget(target_agreement=1.0))
    assert resolve_threshold(CascadeConfig(threshold=0.42), m).value == 0.42
    assert resolve_threshold(CascadeConfig(target_escalation_rate=0.2), m).value == pytest.approx(
        0.2
    )
    assert resolve_threshold(CascadeConfig(target_agreement=0.9), m).value == pytest.approx(0.2)
    rule = resolve_threshold(CascadeConfig(), m)  # the target stored with the version
    assert rule.value == pytest.approx(0.3) and "agreement 1.0" in rule.description


def test_targets_need_calibration_data():
    bare = ModelManifest(version="s1", role="student", created_at=0, labels=["a"])
    with pytest.raises(ValueError, match="calibration data"):
        resolve_threshold(CascadeConfig(target_escalation_rate=0.2), bare)
