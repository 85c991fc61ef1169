"""One scorer: a run whose evaluation records were logged under another scorer than the one
it judges with stops at once, with one line naming both, and consumes nothing."""

import pytest
from test_escalation_log import record
from test_registry import staged_version

from distill.config import DistillConfig
from distill.dataset import read_watermark
from distill.job import run
from distill.scorer_check import ScorerMismatch, check_scorer
from distill.splits import role_of
from serving.contracts.records import EscalationLogWriter
from serving.contracts.registry import Registry


def logged(scorer: str, n: int, start: int = 0) -> list:
    return [record(start + i).model_copy(update={"scorer": scorer}) for i in range(n)]


def test_records_of_the_judging_scorer_pass():
    check_scorer({"calibration": logged("max_prob", 3), "gate": logged("max_prob", 2)}, "max_prob")
    check_scorer({"calibration": [], "gate": []}, "margin")  # nothing to disagree with


def test_another_scorer_is_refused_in_one_line_naming_both():
    with pytest.raises(ScorerMismatch) as info:
        check_scorer({"calibration": logged("margin", 3), "gate": logged("margin", 2)}, "max_prob")
    message = str(info.value)
    assert "\n" not in message
    assert "newest evaluation records were logged with scorer 'margin' (5 of 5)" in message
    assert "judges with scorer 'max_prob'" in message and "`scorer: margin`" in message


def test_a_mix_names_every_other_scorer_with_its_count():
    evaluation = {
        "calibration": logged("max_prob", 4) + logged("margin", 2),
        "gate": logged("entropy", 1),
    }
    with pytest.raises(ScorerMismatch, match=r"'entropy' \(1 of 7\), 'margin' \(2 of 7\)"):
        check_scorer(evaluation, "max_prob")


def test_records_of_an_earlier_scorer_keep_counting_after_a_deliberate_change():
    """Gateway and job moved to margin together: the older max_prob records are rescored
    like any record and stay evidence; only a job left behind is refused."""
    old = [r.model_copy(update={"timestamp": 1.0}) for r in logged("max_prob", 300)]
    new = [r.model_copy(update={"timestamp": 2.0}) for r in logged("margin", 100, start=300)]
    check_scorer({"calibration": old, "gate": new}, "margin")
    with pytest.raises(ScorerMismatch, match=r"'margin' \(100 of 100\)"):
        check_scorer({"calibration": old, "gate": new}, "max_prob")


def test_the_job_fails_on_a_scorer_mismatch_before_any_work_and_consumes_nothing(tmp_path):
    registry = Registry(tmp_path / "registry")
    registry.publish(staged_version(tmp_path, "seed"))
    registry.promote("seed")
    config = DistillConfig(
        registry=str(registry.root),
        log_dir=str(tmp_path / "log"),
        work_dir=tmp_path / "work",
        teacher=tmp_path / "no-teacher-needed",  # the run stops before loading it
        scorer="max_prob",
    )
    texts = [f"headline {i}" for i in range(200)]
    assert any(role_of(t, config.eval.share) != "train" for t in texts)
    log = EscalationLogWriter(tmp_path / "log")
    log.append(
        [
            r.model_copy(update={"text": t})
            for r, t in zip(logged("margin", 200), texts, strict=True)
        ]
    )
    log.close()
    with pytest.raises(ScorerMismatch, match=r"scorer 'margin'.*scorer 'max_prob'"):
        run(config)
    (report,) = registry.runs()
    assert report["result"] == "failed" and report["reason"].startswith("ScorerMismatch: ")
    assert "'margin'" in report["reason"] and "'max_prob'" in report["reason"]
    assert read_watermark(registry.store) == {}  # nothing consumed
