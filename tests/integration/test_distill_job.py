"""The distillation job end to end on the lite default models: a log of escalations made
from the teacher's real answers, then runs that promote, reject and find nothing to do."""

import random
import time
from pathlib import Path

import numpy as np
import pytest

from distill import bbc
from distill.config import DistillConfig
from distill.job import run
from serving.classifier import Classifier
from serving.escalation_log import EscalationLogWriter, EscalationRecord
from serving.registry import Registry

pytestmark = pytest.mark.integration


def write_escalations(cache: Path, log: Path, n: int, scramble: bool = False) -> None:
    """What the gateway would log for ``n`` stream inputs; ``scramble`` makes the teacher's
    distributions random: a log that can only teach the student nonsense."""
    teacher = Classifier(cache / "models" / "teacher", device="cpu")
    student = Classifier(cache / "models" / "student", device="cpu")
    examples = random.Random(n).sample(bbc.read_split(cache / "data", "stream_sentences"), n)
    texts = [e.text for e in examples]
    t_probs, s_probs = teacher.predict(texts).probs, student.predict(texts).probs
    if scramble:
        t_probs = np.random.default_rng(0).dirichlet(np.full(5, 0.2), size=n).astype(np.float32)
    writer = EscalationLogWriter(log)
    writer.append(
        [
            EscalationRecord(
                record_id=f"{'bad' if scramble else 'req'}{i}:0",
                request_id=f"req{i}",
                timestamp=time.time(),
                text=text,
                reason="low_confidence",
                labels=bbc.LABELS,
                student_version=student.version,
                student_probs=s.tolist(),
                scorer="max_prob",
                confidence=float(s.max()),
                threshold=0.9,
                teacher_version=teacher.version,
                teacher_probs=t.tolist(),
                teacher_label=bbc.LABELS[int(t.argmax())],
            )
            for i, (text, t, s) in enumerate(zip(texts, t_probs, s_probs, strict=True))
        ]
    )
    writer.close()


def job_config(cache: Path, root: Path, **train) -> DistillConfig:
    return DistillConfig.model_validate(
        {
            "registry": root / "registry",
            "log_dir": root / "log",
            "data_dir": cache / "data",
            "teacher": cache / "models" / "teacher",
            "min_records": 50,
            "holdout_sentences": 300,
            "calibration_size": 400,
            "device": "cpu",
            "train": {
                "epochs": 2,
                "batch_size": 16,
                "max_tokens": 48,
                "lr_encoder": 5e-5,
                "lr_head": 2e-3,
                **train,
            },
            "replay": {"earlier_records": 50, "seed_examples": False},
            "gate": {"target_agreement": 0.95, "min_rate_drop": 0.01, "accuracy_tolerance": 0.02},
        }
    )


@pytest.fixture()
def seeded_registry(lite_cache, tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    registry.promote(registry.import_folder(lite_cache / "models" / "student"))
    return registry


def test_distilling_on_teacher_answers_promotes_then_finds_nothing_to_do(
    lite_cache, tmp_path, seeded_registry
):
    seed = seeded_registry.current()
    write_escalations(lite_cache, tmp_path / "log", 400)
    report = run(job_config(lite_cache, tmp_path))
    assert report["result"] == "promoted", report["reason"]
    before, after = report["eval"]["current"], report["eval"]["candidate"]
    assert after["teacher_agreement"] > before["teacher_agreement"]
    assert after["escalation_rate"] <= before["escalation_rate"] - 0.01
    current = seeded_registry.current()
    assert current == report["candidate"] != seed
    manifest = seeded_registry.manifest(current)
    assert manifest.parent == seed and manifest.calibration is not None
    assert manifest.eval["threshold"] == pytest.approx(
        manifest.calibration.threshold("max_prob", target_agreement=0.95)
    )
    assert manifest.training["window"]["new_records"] == 400
    again = run(job_config(lite_cache, tmp_path))
    assert again["result"] == "nothing-to-do" and "0 new records" in again["reason"]
    runs = sorted((seeded_registry.root / "runs").glob("*.json"))
    assert len(runs) == 2
    assert not list((seeded_registry.root / "staging").glob("*"))  # nothing half-published


def test_a_worse_candidate_is_rejected_and_nothing_changes(lite_cache, tmp_path, seeded_registry):
    seed = seeded_registry.current()
    write_escalations(lite_cache, tmp_path / "log", 300, scramble=True)
    report = run(job_config(lite_cache, tmp_path, lr_encoder=5e-4, lr_head=5e-3, epochs=3))
    assert report["result"] == "rejected", report["eval"]
    assert seeded_registry.current() == seed
    assert [m.version for m in seeded_registry.versions()] == [seed]
    assert not list((seeded_registry.root / "staging").glob("*"))


def test_a_failed_run_is_reported_and_publishes_nothing(
    lite_cache, tmp_path, seeded_registry, monkeypatch
):
    import distill.job

    seed = seeded_registry.current()
    write_escalations(lite_cache, tmp_path / "log", 60)

    def crash(*_, **__):
        raise RuntimeError("out of memory in the middle of evaluation")

    monkeypatch.setattr(distill.job, "gate", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(job_config(lite_cache, tmp_path, epochs=1))
    assert seeded_registry.current() == seed and len(seeded_registry.versions()) == 1
    (report,) = [p.read_text() for p in (seeded_registry.root / "runs").glob("*.json")]
    assert '"failed"' in report and "out of memory" in report
    assert not (seeded_registry.root / "watermark.json").exists()  # the records stay unconsumed


def test_missing_log_folder_and_empty_registry_are_clear(lite_cache, tmp_path):
    from serving.registry import RegistryError

    with pytest.raises(RegistryError, match="registry import"):
        run(job_config(lite_cache, tmp_path))
    registry = Registry(tmp_path / "registry")
    registry.promote(registry.import_folder(lite_cache / "models" / "student"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(job_config(lite_cache, tmp_path))
