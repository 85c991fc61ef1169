"""A generative distillation run end to end on tiny random Llamas built in the test, in
process: the task made ready by `protege init`, a log of escalations and audits, a run
that trains for real, a run that judges a planted candidate answering as the teacher does
(promoted: a round of training on random models cannot be counted on to improve) and a
copy of the current student (refused); the watermark, the manifest and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from test_dataset import prompts
from test_generation_records import generation
from tiny_lm import build_tiny_lm

from distill.config import load_distill_config
from distill.dataset import read_watermark
from distill.generate_config import GenerateDistillConfig
from distill.generate_job import run_generate
from distill.generation_examples import prompt_ids
from protege.cli import main
from serving.contracts.generation_records import TopKLogprobs
from serving.contracts.records import EscalationLogWriter
from serving.contracts.registry import Registry
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model

MAX_NEW, K = 6, 4
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "stop": []}


@pytest.fixture
def task(tmp_path) -> GenerateDistillConfig:
    """`protege init` on a tiny pair, then the job's config with small evidence bars."""
    student = build_tiny_lm(tmp_path / "pair" / "student", seed=2)
    teacher = build_tiny_lm(tmp_path / "pair" / "teacher", seed=1)
    (tmp_path / "traffic.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Traffic prompt {i}"}) + "\n" for i in range(6))
    )
    spec = {
        "name": "tiny-chat",
        "kind": "generate",
        "teacher": str(teacher),
        "student": str(student),
        "traffic": "traffic.jsonl",
        "workdir": "work",
        "max_new_tokens": MAX_NEW,
        "max_prompt_tokens": 64,
        "batch_size": 8,
    }
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(spec))
    assert main(["init", str(tmp_path / "task.yaml")]) == 0
    config = load_distill_config(tmp_path / "work" / "distill.yaml")
    assert isinstance(config, GenerateDistillConfig)
    return config.model_copy(
        update={
            "min_records": 4,
            "top_k": K,
            "eval": config.eval.model_copy(update={"share": 0.5, "min_calibration_sampled": 6}),
            "gate": config.gate.model_copy(
                update={"min_sampled": 8, "min_requests": 8, "bootstrap_draws": 200}
            ),
            "work_dir": tmp_path / "work" / "distill-work",
        }
    )


def write_log(config: GenerateDistillConfig, start: int) -> None:
    """Escalations the teacher answered (with its top-k) in every split, and audited kept
    answers in the evaluation splits."""
    teacher = load_language_model(config.teacher, "cpu")
    records = []
    for role, count in (("train", 6), ("calibration", 10), ("gate", 12)):
        for i, prompt in enumerate(prompts(role, start + count)[start:]):
            n = start * 100 + len(records)
            fields = {"prompt": prompt, "messages": None, "sampling": SAMPLING}
            fields |= {"record_id": f"r{n}", "request_key": f"k{n}", "scorer": config.scorer}
            if role == "train" or i % 3 == 0:
                record = generation(n, **fields, draft_tokens=None, draft_accepted=None)
                (answer,) = generate_batch(
                    teacher,
                    [prompt_ids(teacher.tokenizer, record)],
                    SamplingSettings(MAX_NEW),
                    top_k=K,
                )
                top = TopKLogprobs.from_pairs(answer.token_ids, answer.top_logprobs)
                record = record.model_copy(
                    update={
                        "teacher_version": "someone-else",  # answered again offline
                        "teacher_text": answer.text,
                        "teacher_top_logprobs": top if answer.token_ids else None,
                    }
                )
            else:
                record = generation(
                    n,
                    **fields,
                    reason="audit",
                    inclusion_probability=0.5,
                    teacher_status="skipped",
                    teacher_version=None,
                    teacher_text=None,
                    teacher_top_logprobs=None,
                    draft_tokens=None,
                    draft_accepted=None,
                )
            records.append(record)
    writer = EscalationLogWriter(Path(config.log_dir))
    writer.append(records)
    writer.close()


def planted(folder: Path):
    """A trainer that puts ``folder``'s weights in the candidate's place."""

    def train(current, examples, staged):
        assert examples  # the job built its training pairs
        shutil.copytree(folder, staged, ignore=shutil.ignore_patterns("protege.json"))
        return [0.0]

    return train


def test_a_run_trains_for_real_and_reports_its_cost(task, tmp_path):
    write_log(task, 0)
    held_out = prompts("train", 1)[0]  # a gold prompt that was also served: never trained on
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"prompt": held_out, "reference": "a headline"}) + "\n")
    report = run_generate(task.model_copy(update={"gold": gold}))
    assert report["kind"] == "generate" and report["result"] in ("promoted", "rejected")
    training = report["training"]
    assert training["examples"] == 5 and training["top_k_examples"] == 5  # 6 less gold's
    assert len(training["epoch_losses"]) == 1 and training["epoch_losses"][0] > 0
    cost = report["offline_generation"]
    # every teacher answer was logged by another version: asked again, as the audits were
    assert cost["answers_of_another_teacher_version"] == 5
    assert cost["teacher_answers"] == 5 + 10 + 12  # training, calibration and gate records
    assert set(cost["student_answers"]) == {report["current"], report["candidate"]}
    assert all(n > 0 for n in cost["student_answers"].values())
    assert report["calibration"]["kind"] == "live_traffic"
    registry = Registry(task.registry)
    assert read_watermark(registry.store)  # consumed, promoted or not


def test_a_candidate_answering_as_the_teacher_is_promoted_and_a_copy_is_refused(task):
    registry = Registry(task.registry)
    seed = registry.current()
    write_log(task, 0)
    report = run_generate(task, trainer=planted(task.teacher))
    assert report["result"] == "promoted", report["reason"]
    promoted = registry.current()
    assert promoted == report["candidate"] != seed
    manifest = registry.manifest(promoted)
    assert manifest.kind == "generate" and manifest.parent == seed
    assert manifest.calibration is not None and manifest.agreement_cut == task.agreement_cut
    assert manifest.max_new_tokens == MAX_NEW
    candidate = report["decision"]["candidate"]
    assert candidate["student_agreement"]["value"] == 1.0  # it answers as the teacher does
    likelihood = report["teacher_likelihood"]
    assert likelihood["candidate"] > likelihood["current"]
    watermark = read_watermark(registry.store)

    write_log(task, 40)  # new traffic for the next round
    copy = run_generate(task, trainer=planted(registry.path(promoted)))
    assert copy["result"] == "rejected" and registry.current() == promoted
    assert "agreement gain +0.0% is not above 0" in copy["reason"]
    assert read_watermark(registry.store) != watermark  # its records were consumed


def test_the_judge_answers_a_fixed_sample_of_a_large_prompt_file(tmp_path):
    from distill.generate_job import sample_prompts

    path = tmp_path / "traffic.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Prompt {i}"}) + "\n" for i in range(50)))
    first = sample_prompts(path, reference=False, limit=7)
    assert len(first) == 7 and len({p.prompt for p in first}) == 7
    assert sample_prompts(path, reference=False, limit=7) == first  # the same sample every run
    assert len(sample_prompts(path, reference=False, limit=100)) == 50
    assert sample_prompts(None, reference=False, limit=7) == []
