"""The generative judge on tiny random Llamas built in the test: greedy answers on both
sides, the serving scorer over the student's own tokens, agreement by ROUGE-L against the
teacher's greedy answer, live calibration (or the traffic sample less what was trained
on), answers kept per version, and a student as good as the teacher judged so."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_dataset import SHARE, prompts
from test_generation_records import generation
from tiny_lm import build_tiny_lm

from distill.dataset import read_generation_window
from distill.generate_judge import GenerateJudge, JudgeSettings
from distill.generation_examples import prompt_ids
from distill.offline_answers import OfflineAnswers
from distill.prompts import TaskPrompt
from distill.splits import normalise
from serving.contracts.generation_records import canonical_prompt
from serving.contracts.records import EscalationLogWriter
from serving.generate.agreement import rouge_l_many
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model
from serving.generate.scorers import SCORERS

MAX_NEW, VERSION = 6, "teacher-1"
SETTINGS = JudgeSettings(
    "mean_logprob", 0.5, 0.9, min_calibration_sampled=2, max_new_tokens=MAX_NEW
)
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "stop": []}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    teacher = build_tiny_lm(root / "teacher", seed=1)
    student = build_tiny_lm(root / "student", seed=2)
    twin = root / "twin"  # a student that answers as the teacher does
    shutil.copytree(teacher, twin)
    return load_language_model(teacher, "cpu"), student, twin


def greedy(lm, record):
    """The greedy answer under the record's own limits, as both sides are judged."""
    settings = SamplingSettings(
        min(record.sampling.max_new_tokens, MAX_NEW), stop=tuple(record.sampling.stop)
    )
    (answer,) = generate_batch(lm, [prompt_ids(lm.tokenizer, record)], settings)
    return answer


def audit(i, prompt):
    return generation(
        i,
        prompt=prompt,
        messages=None,
        reason="audit",
        inclusion_probability=0.25,
        teacher_status="skipped",
        teacher_version=None,
        teacher_text=None,
        teacher_top_logprobs=None,
        draft_tokens=None,
        draft_accepted=None,
        sampling=SAMPLING,
    )


@pytest.fixture(scope="module")
def window(models, tmp_path_factory):
    """Calibration and gate records: audits, and escalations the teacher answered."""
    teacher = models[0]
    log = tmp_path_factory.mktemp("log")
    records = []
    for role in ("calibration", "gate"):
        for i, prompt in enumerate(prompts(role, 4)):
            record = audit(100 * (role == "gate") + i, prompt)
            if role == "gate" and i == 2:  # a client that asked for less, with a stop string
                short = {**SAMPLING, "max_new_tokens": 3, "stop": ["e"]}
                record = record.model_copy(
                    update={"sampling": record.sampling.model_validate(short)}
                )
            if i % 2:  # an escalation, logged with the teacher's (greedy) answer
                answer = greedy(teacher, record).text
                record = record.model_copy(
                    update={
                        "reason": "low_confidence",
                        "inclusion_probability": 1.0,
                        "teacher_status": "answered",
                        "teacher_version": VERSION,
                        "teacher_text": answer,
                    }
                )
            records.append(record)
    writer = EscalationLogWriter(log)
    writer.append(records)
    writer.close()
    return read_generation_window(log, {}, eval_share=SHARE, replay=0, seed=0)


def test_the_judge_scores_greedy_answers_against_the_teachers(models, window, tmp_path):
    teacher, student, _ = models
    offline = OfflineAnswers(teacher, VERSION, tmp_path, top_k=0)
    judge = GenerateJudge(SETTINGS, offline, window, tmp_path)
    assert judge.live and offline.asked == 4  # the audits answered offline, once
    judged, calibration = judge(student)
    lm = load_language_model(student, "cpu")
    mine = [greedy(lm, r) for r in window.evaluation["gate"]]
    theirs = [greedy(teacher, r).text for r in window.evaluation["gate"]]
    expected = rouge_l_many([a.text for a in mine], theirs) >= 0.5
    assert judged.agrees.tolist() == expected.tolist()
    assert mine[2].completion_tokens <= 3 and "e" not in mine[2].text  # its own limits
    scores = SCORERS["mean_logprob"]([a.logprobs for a in mine])
    assert np.allclose(judged.confidence, scores, atol=1e-5)
    assert calibration.kind == "live_traffic" and calibration.weights == [4.0, 1.0, 4.0, 1.0]
    assert judged.threshold == calibration.threshold("mean_logprob", target_agreement=0.9)


def test_a_student_answering_as_the_teacher_agrees_everywhere(models, window, tmp_path):
    teacher, _, twin = models
    judge = GenerateJudge(SETTINGS, OfflineAnswers(teacher, VERSION, tmp_path, 0), window, tmp_path)
    judged, calibration = judge(twin)
    assert judged.agrees.all() and all(calibration.agrees_with_teacher)
    other, _ = judge(models[1])
    twin_likelihood, other_likelihood = (
        judge.likelihood[judged.version],
        judge.likelihood[other.version],
    )
    assert twin_likelihood is not None and other_likelihood is not None
    assert other_likelihood < twin_likelihood < 0  # the teacher's own answers are likelier


def test_answers_are_kept_per_version(models, window, tmp_path):
    teacher, student, _ = models
    offline = OfflineAnswers(teacher, VERSION, tmp_path, 0)
    first = GenerateJudge(SETTINGS, offline, window, tmp_path)(student)[0]
    again = GenerateJudge(SETTINGS, OfflineAnswers(teacher, VERSION, tmp_path, 0), window, tmp_path)
    cached = list((tmp_path).glob("student-*/greedy_6.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 8
    second = again(student)[0]
    assert second.agrees.tolist() == first.agrees.tolist()
    assert len(cached[0].read_text().splitlines()) == 8  # nothing asked twice


def test_without_live_evidence_it_calibrates_on_traffic_it_never_trained_on(
    models, window, tmp_path
):
    teacher, student, _ = models
    traffic = [TaskPrompt(prompt=f"Traffic prompt number {i}") for i in range(5)]
    trained = {normalise(canonical_prompt(traffic[0].prompt or ""))}
    strict = JudgeSettings(
        "mean_logprob", 0.5, 0.9, min_calibration_sampled=50, max_new_tokens=MAX_NEW
    )
    offline = OfflineAnswers(teacher, VERSION, tmp_path, 0)
    judge = GenerateJudge(strict, offline, window, tmp_path, traffic=traffic, trained_on=trained)
    assert not judge.live and judge.traffic_dropped == 1
    _, calibration = judge(student)
    assert calibration.kind == "traffic_sample" and len(calibration.agrees_with_teacher) == 4
    with pytest.raises(ValueError, match="every prompt of the traffic sample was trained on"):
        everything = {normalise(canonical_prompt(p.prompt or "")) for p in traffic}
        GenerateJudge(strict, offline, window, tmp_path, traffic=traffic, trained_on=everything)


def test_gold_is_scored_by_rouge_l_against_the_reference(models, window, tmp_path):
    teacher, _, twin = models
    gold = [TaskPrompt(prompt=f"Gold prompt {i}", reference="the cat sat") for i in range(3)]
    judge = GenerateJudge(
        SETTINGS, OfflineAnswers(teacher, VERSION, tmp_path, 0), window, tmp_path, gold=gold
    )
    judged, _ = judge(twin)
    assert judge.teacher_gold is not None and judged.gold_correct is not None
    assert np.allclose(judged.gold_correct, judge.teacher_gold)  # the twin answers as the teacher
    assert judged.gold_confidence is not None and len(judged.gold_confidence) == 3
