"""A version served through ONNX Runtime: same answers, its own version, and promoted only
where its decisions match the float version's and it is faster."""

import random
import shutil
import time

import numpy as np
import pytest
from tiny_models import LABELS

from distill import optimize
from distill.gate import make_calibration
from distill.optimize import optimize_student, optimize_teacher, verdict
from serving.classify.classifier import Classifier
from serving.contracts.manifest import DefaultTarget, ModelManifest, read_manifest, write_manifest
from serving.contracts.registry import Registry

WORDS = [
    "the",
    "market",
    "fell",
    "as",
    "the",
    "striker",
    "scored",
    "while",
    "ministers",
    "argued",
    "over",
    "new",
    "chips",
]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 40))) for _ in range(n)]


@pytest.mark.parametrize("role", [0, 1])  # a mean-pooled BERT student, a plain BERT teacher
def test_onnx_answers_as_torch_does(tiny_pair, role):
    inputs = [*texts(40), "word " * 100]  # one truncated
    float_model = Classifier(tiny_pair[role], "cpu")
    onnx_model = Classifier(tiny_pair[role], "cpu", runtime="onnx")
    assert onnx_model.runtime == "onnx"
    a, b = float_model.predict(inputs), onnx_model.predict(inputs)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    assert a.truncated == b.truncated and a.truncated[-1]


def test_the_bound_and_the_speed_decide():
    assert verdict(0.996, {1: 2.0, 32: 1.1}, 0.995)[0]
    refused, reason = verdict(0.994, {1: 2.0, 32: 1.1}, 0.995)
    assert not refused and "99.40%" in reason and "below the bound" in reason
    assert not verdict(1.0, {1: 1.01, 32: 1.2}, 0.995)[0]  # not measurably faster
    assert not verdict(1.0, {1: 2.0, 32: 0.9}, 0.995)[0]  # slower on full batches


@pytest.fixture()
def seeded(tmp_path, tiny_pair):
    """A registry whose current version is the tiny student, calibrated on ``texts``."""
    folder = tmp_path / "seed"
    shutil.copytree(tiny_pair[0], folder)
    model, teacher = Classifier(folder, "cpu"), Classifier(tiny_pair[1], "cpu")
    inputs = texts(300)
    calibration = make_calibration(
        model.predict(inputs).probs, teacher.predict(inputs).probs.argmax(1), "test traffic"
    )
    manifest = ModelManifest(
        version="student-seed",
        role="student",
        created_at=time.time(),
        labels=LABELS,
        default_target=DefaultTarget(target_agreement=0.9),
        calibration=calibration,
    )
    write_manifest(folder, manifest)
    registry = Registry(tmp_path / "registry")
    registry.promote(registry.import_folder(folder))
    return registry, teacher, inputs


@pytest.fixture()
def faster(monkeypatch):
    """The runtime's speed, fixed: these tests are about agreement and publishing."""
    monkeypatch.setattr(
        optimize,
        "rate",
        lambda model, texts, batch, seconds: 3.0 if model.runtime != "torch" else 1.0,
    )


def test_an_accepted_runtime_is_its_own_recalibrated_version_and_serves(seeded, tmp_path, faster):
    registry, teacher, inputs = seeded
    trial = optimize_student(
        registry, "student-seed", "onnx", inputs, teacher, "max_prob", tmp_path / "scores"
    )
    assert trial.accepted and trial.agreement >= 0.995, trial.reason
    assert registry.current() == "student-seed-onnx"
    manifest = registry.manifest("student-seed-onnx")
    assert manifest.runtime == "onnx" and manifest.parent == "student-seed"
    assert manifest.calibration is not None and len(manifest.calibration.agrees_with_teacher) == 300
    assert Classifier(registry.path("student-seed-onnx"), "cpu").runtime == "onnx"


def test_a_runtime_below_the_agreement_bound_is_refused_and_nothing_changes(
    seeded, tmp_path, faster
):
    registry, teacher, inputs = seeded
    # int8 weights change some answers; no model can agree on more than all inputs
    trial = optimize_student(
        registry,
        "student-seed",
        "onnx-int8",
        inputs,
        teacher,
        "max_prob",
        tmp_path / "scores",
        bound=1.01,
    )
    assert not trial.accepted and "below the bound" in trial.reason
    assert registry.current() == "student-seed"
    assert not registry.exists("student-seed-onnx-int8")
    assert not list(registry.staging_dir().glob("*"))


def test_the_teacher_switches_in_place_only_when_accepted(tmp_path, tiny_pair, faster):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_pair[1], folder)
    write_manifest(
        folder, ModelManifest(version="teacher-t", role="teacher", created_at=0, labels=LABELS)
    )
    refused = optimize_teacher(folder, "onnx", texts(100), bound=1.01)
    assert not refused.accepted and read_manifest(folder).runtime == "torch"
    accepted = optimize_teacher(folder, "onnx", texts(100))
    assert accepted.accepted
    manifest = read_manifest(folder)
    assert (manifest.version, manifest.runtime, manifest.parent) == (
        "teacher-t-onnx",
        "onnx",
        "teacher-t",
    )


def test_a_version_calibrated_on_live_traffic_is_not_recalibrated_on_the_sample(seeded, tmp_path):
    registry, teacher, inputs = seeded
    live = registry.manifest("student-seed")
    assert live.calibration is not None
    staged = tmp_path / "live"
    shutil.copytree(registry.path("student-seed"), staged)
    (staged / "_complete.json").unlink(missing_ok=True)
    calibration = live.calibration.model_copy(update={"kind": "live_traffic"})
    write_manifest(
        staged, live.model_copy(update={"version": "student-live", "calibration": calibration})
    )
    registry.publish(staged)
    with pytest.raises(ValueError, match="calibrated on live traffic"):
        optimize_student(
            registry, "student-live", "onnx", inputs, teacher, "max_prob", tmp_path / "s"
        )


def test_a_promotion_while_optimizing_stands(seeded, tmp_path, monkeypatch):
    registry, teacher, inputs = seeded
    other = tmp_path / "other"
    shutil.copytree(registry.path("student-seed"), other)
    (other / "_complete.json").unlink(missing_ok=True)
    write_manifest(
        other, registry.manifest("student-seed").model_copy(update={"version": "student-other"})
    )
    registry.publish(other)

    def rate_while_an_operator_promotes(model, texts, batch, seconds):
        if registry.current() == "student-seed":
            registry.promote("student-other")
        return 3.0 if model.runtime != "torch" else 1.0

    monkeypatch.setattr(optimize, "rate", rate_while_an_operator_promotes)
    trial = optimize_student(
        registry, "student-seed", "onnx", inputs, teacher, "max_prob", tmp_path / "s"
    )
    assert not trial.accepted and "not promoted: current is student-other" in trial.reason
    assert registry.current() == "student-other"  # the operator's promotion is not undone
    assert registry.exists("student-seed-onnx")


def test_a_generative_version_is_refused_with_the_reason(seeded, tmp_path):
    registry, teacher, inputs = seeded
    seed = registry.manifest("student-seed")
    staged = tmp_path / "generative"
    shutil.copytree(registry.path("student-seed"), staged)
    (staged / "_complete.json").unlink(missing_ok=True)
    write_manifest(
        staged, seed.model_copy(update={"version": "student-generate", "kind": "generate"})
    )
    registry.publish(staged)
    with pytest.raises(ValueError, match=r"generative .* served on PyTorch"):
        optimize_student(
            registry, "student-generate", "onnx", inputs, teacher, "max_prob", tmp_path / "s"
        )
