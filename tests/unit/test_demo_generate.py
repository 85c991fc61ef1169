"""The generative demo's parts on tiny random Llamas: the gold holdout measures a version
as it would serve (its calibrated threshold) and by the escalation it needs; the demo's
configs are the default pair's with the demo's settings; its report prints and draws."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_lm import build_tiny_lm

from distill.generate_judge import prompt_key
from distill.greedy_cache import GreedyCache
from distill.prompts import TaskPrompt
from protege.demo_generate import DemoSettings, distill_config, serve_config
from protege.demo_generate_holdout import GenerateHoldout, HoldoutSettings
from protege.demo_generate_report import markdown, plot, print_round, print_summary
from serving.config import GatewayConfig
from serving.contracts.manifest import ModelManifest, make_calibration, write_manifest
from serving.contracts.threshold import should_escalate
from serving.generate.agreement import rouge_l_many
from serving.generate.models import load_language_model
from serving.generate.scorers import SCORERS

MAX_NEW = 6
PROMPTS = [
    TaskPrompt(messages=(("user", f"Write a headline about story {i}."),), reference=f"story {i}")
    for i in range(12)
]
SETTINGS = HoldoutSettings("mean_logprob", 0.5, 0.8, MAX_NEW, batch_size=4)


def calibrated(folder, version, confidence, agrees):
    calibration = make_calibration({name: confidence for name in SCORERS}, agrees, "test")
    write_manifest(
        folder,
        ModelManifest(
            version=version,
            role="student",
            created_at=0.0,
            kind="generate",
            calibration=calibration,
        ),
    )
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    teacher = build_tiny_lm(root / "models" / "teacher", seed=1)
    student = build_tiny_lm(root / "models" / "student", seed=2)
    holdout = GenerateHoldout(
        PROMPTS, load_language_model(teacher, "cpu"), "teacher-1", root / "cache", SETTINGS, "cpu"
    )
    return root, teacher, student, holdout


def test_a_student_that_is_the_teacher_needs_no_escalation(pair, tmp_path):
    _root, teacher, _, holdout = pair

    twin = calibrated(shutil.copytree(teacher, tmp_path / "twin"), "twin", [-1.0] * 4, [True] * 4)
    figures = holdout.figures(twin)
    assert figures["version"] == "twin"
    assert figures["student_agreement"] == 1.0 and figures["escalation_needed"] == 0.0
    assert figures["student_rouge_l_gold"] == pytest.approx(holdout.teacher_rouge_l_gold)
    assert figures["cascade_rouge_l_gold"] == pytest.approx(holdout.teacher_rouge_l_gold)


def test_a_version_is_measured_at_its_own_calibrated_threshold(pair):
    root, _teacher, student, holdout = pair
    lm = load_language_model(student, "cpu")
    answers = GreedyCache(lm, "student-a", root / "cache", MAX_NEW).answers(
        [prompt_key(p) for p in PROMPTS], [p.render(lm) for p in PROMPTS]
    )
    confidence = np.array(SCORERS["mean_logprob"]([a.logprobs for a in answers]))
    assert len(set(confidence.tolist())) == len(PROMPTS)  # no ties: the cut is one prompt
    # calibrated on these very confidences, the least confident half disagreeing: for 0.8
    # agreement the 4 least confident of 12 escalate (4 + 6 agreeing >= 9.6); the stored
    # calibration is rounded to 6 places, so the 5th may sit on the threshold
    calibrated(student, "student-a", confidence, confidence >= np.median(confidence))
    figures = holdout.figures(student)
    assert 4 / 12 <= figures["escalation_rate"] <= 5 / 12
    escalated = should_escalate(confidence, figures["threshold"])
    assert figures["escalation_rate"] == pytest.approx(float(np.mean(escalated)))
    agrees = rouge_l_many([a.text for a in answers], holdout.teacher_texts) >= 0.5
    assert figures["student_agreement"] == pytest.approx(float(agrees.mean()))
    assert figures["cascade_agreement"] == pytest.approx(
        float(np.where(escalated, True, agrees).mean())
    )
    student_gold = rouge_l_many([a.text for a in answers], holdout.references)
    cascade_gold = np.where(escalated, holdout.teacher_gold, student_gold)
    assert figures["cascade_rouge_l_gold"] == pytest.approx(float(cascade_gold.mean()))
    low, high = figures["escalation_needed_95"]
    assert 0.0 <= low <= high <= 1.0


def test_the_demo_configs_carry_its_settings(pair, tmp_path):
    root, teacher, _student, _ = pair
    path = tmp_path / "distill.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kind": "generate",
                "registry": str(root / "registry"),
                "log_dir": str(root / "generations"),
                "teacher": str(teacher),
            }
        )
    )
    demo = DemoSettings(min_sampled=7, lr=1e-3)
    config = distill_config(path, tmp_path / "out", demo, seed=2)
    assert config.registry == str(tmp_path / "out" / "registry")
    assert config.log_dir == str(tmp_path / "out" / "generations")
    assert (config.gate.min_sampled, config.gate.min_requests) == (7, 7)
    assert config.gate.target_agreement == demo.target_agreement
    assert (config.train.seed, config.train.lr, config.eval.share) == (2, 1e-3, demo.eval_share)
    served = serve_config(root, tmp_path / "out", demo)
    args = served["applications"][0]["args"]
    GatewayConfig.model_validate(args)
    assert args["generate"]["audit_fraction"] == 1.0
    assert args["generate"]["target_agreement"] == demo.target_agreement
    assert args["generate"]["registry"] == str((tmp_path / "out" / "registry").resolve())
    with pytest.raises(ValueError, match="kind: generate"):  # the classification job's
        distill_config(Path("deploy/distill.yaml"), tmp_path / "out", demo, seed=0)


def a_run(figures: dict, result: str = "rejected") -> dict:
    """One demo run's ``demo.json`` of one round, around real holdout figures."""
    estimate = {"value": 0.6, "low": 0.5, "high": 0.7, "sampled": 12, "records": 40}
    row = {
        "round": 1,
        "served_versions": ["student-a"],
        "served_prompts": 40,
        "failed_requests": 0,
        "served_escalation_rate": 0.65,
        "throughput_rps": 1.2,
        "latency_ms": {"p50": 900, "p95": 2000},
        "distill_seconds": 300.0,
        "swap_seconds": None,
        "result": result,
        "reason": "the escalation needed drops by +1.0%",
        "decision": {
            "current": {
                "version": "student-a",
                "escalation_rate": estimate,
                "cascade_agreement": estimate,
            }
        },
        "training": {"examples": 20, "top_k_examples": 18, "seconds": 30.0},
        "offline_generation": {"judge_seconds": 50.0},
        "teacher_likelihood": {"current": -3.1, "candidate": -3.0},
        "holdout": figures,
    }
    summary = {
        "seed": figures,
        "final": figures,
        "teacher_rouge_l_gold": 0.25,
        "holdout_prompts": len(PROMPTS),
        "settings": DemoSettings().__dict__ | {"target_agreement": 0.8},
        "agreement_cut": 0.5,
        "rounds_promoted": int(result == "promoted"),
        "minutes_after_build": 12.0,
        "build_minutes": 0.1,
        "demo_seed": 0,
    }
    return {"rounds": [row], "summary": summary}


def test_the_report_prints_each_round_and_draws_the_curve(pair, tmp_path, capsys):
    *_, holdout = pair
    run = a_run(holdout.figures(pair[2]))
    (row,), summary = run["rounds"], run["summary"]
    print_round(row)
    print_summary([row], summary)
    out = capsys.readouterr().out
    assert "rejected: the escalation needed drops" in out
    assert "60.0% [50.0%, 70.0%]" in out  # the live estimate with its interval
    assert "0 of 1 rounds promoted; 12.0 minutes after the build" in out
    page = markdown(run, "curve.png")
    assert "| 1 | student-a | 65.0% | 60.0% [50.0%, 70.0%] | 12 |" in page
    assert "| 20 | -3.10 -> -3.00 | 300 |" in page  # the pairs, the imitation, the job's time
    assert "0 of 1 rounds promoted; 0 requests failed" in page and "(curve.png)" in page
    plot([row], summary, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_spread_counts_the_rounds_promoted_over_the_seeds(pair, tmp_path):
    import json

    from protege.cli import main

    figures = pair[3].figures(pair[2])
    folders = []
    for seed, result in ((0, "promoted"), (1, "rejected")):
        run = a_run(figures, result)
        run["summary"]["demo_seed"] = seed
        (tmp_path / f"run-{seed}").mkdir()
        (tmp_path / f"run-{seed}" / "demo.json").write_text(json.dumps(run))
        folders.append(str(tmp_path / f"run-{seed}"))
    page = tmp_path / "generation.md"
    page.write_text("<!-- demo-generate-spread:begin -->\n<!-- demo-generate-spread:end -->\n")
    assert main(["demo-spread", *folders, "--docs", str(page)]) == 0
    text = page.read_text()
    assert "| 0 | promoted |" in text and "| 1 | rejected |" in text
    assert "over 2 seeds: 1 of 2 rounds promoted" in text
