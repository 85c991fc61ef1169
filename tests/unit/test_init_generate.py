"""`protege init` on a generative task (``kind: generate``), on tiny random Llama models
built in the test: the pair checked (one tokenizer for token-level distillation), the
prompts read and checked, the seed calibrated on both models' greedy answers, registered,
and a serve config the gateway's own checks accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny_lm import build_tiny_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.config import load_distill_config
from distill.generate_config import GenerateDistillConfig
from distill.prepare_generate import check_generative_pair
from distill.prompts import read_prompts
from distill.tables import TableError
from distill.task import GenerateTaskSpec, TaskError, TaskSpec, load_task
from protege.cli import main
from serving.app import check_generate
from serving.config import GatewayConfig
from serving.contracts.manifest import read_manifest
from serving.contracts.registry import Registry
from serving.generate.scorers import SCORERS

CHATS = [[{"role": "user", "content": f"Say something about item {i}."}] for i in range(6)]
PROMPTS = [f"Markets moved on day {i} as" for i in range(4)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return build_tiny_lm(root / "student", seed=2), build_tiny_lm(root / "teacher", seed=1)


@pytest.fixture
def task(tmp_path, pair):
    student, teacher = pair
    traffic = [{"messages": m} for m in CHATS] + [{"prompt": p} for p in PROMPTS]
    write_jsonl(tmp_path / "traffic.jsonl", traffic)
    gold = [
        {"messages": CHATS[0], "reference": "item zero"},
        {"prompt": PROMPTS[0], "reference": "up"},
    ]
    write_jsonl(tmp_path / "gold.jsonl", gold)

    def write(**fields) -> Path:
        spec = {
            "name": "chat-task",
            "kind": "generate",
            "teacher": str(teacher),
            "student": str(student),
            "traffic": "traffic.jsonl",
            "gold": "gold.jsonl",
            "workdir": "work",
            "traffic_limit": 8,
            "batch_size": 4,
            "max_new_tokens": 6,
            "max_prompt_tokens": 64,
            **fields,
        }
        path = tmp_path / "task.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return write


def test_init_calibrates_registers_and_writes_a_serve_config(task, capsys):
    path = task()
    spec = load_task(path)
    assert isinstance(spec, GenerateTaskSpec) and spec.distillation == "token"
    assert main(["init", str(path)]) == 0
    out = capsys.readouterr().out
    assert "answering 8 traffic and 2 gold prompts" in out and "min left" in out
    report = json.loads((spec.work / "init_report.json").read_text())
    registry = Registry(spec.registry_dir)
    assert registry.current() == report["student"]
    manifest = read_manifest(registry.path(report["student"]))
    assert manifest is not None and manifest.kind == "generate"
    assert (manifest.agreement_cut, manifest.max_new_tokens) == (0.5, 6)
    calibration = manifest.calibration
    assert calibration is not None and set(calibration.confidences) == set(SCORERS)
    assert len(calibration.agrees_with_teacher) == 8  # the traffic sample, never gold
    figures = report["figures"]
    assert figures["agreement"] == pytest.approx(sum(calibration.agrees_with_teacher) / 8)
    assert {"student_gold_rouge_l", "teacher_gold_rouge_l"} <= set(figures)
    assert set(report["escalation_by_target"]["0.90"]) == set(SCORERS)
    serve = yaml.safe_load(Path(report["serve_config"]).read_text())
    config = GatewayConfig.model_validate(serve["applications"][0]["args"])
    assert config.generate is not None and not config.classify
    assert config.generate.name == "chat-task"
    check_generate(config.generate)  # the gateway's own checks accept it
    distill = load_distill_config(Path(report["distill_config"]))
    assert isinstance(distill, GenerateDistillConfig) and distill.distillation == "token"
    assert distill.registry == str(spec.registry_dir.resolve()) and distill.gold is not None
    rows = [json.loads(line) for line in (spec.work / "traffic.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(("prompt" in r) != ("messages" in r) for r in rows)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory, pair) -> Path:
    """The student with one more token: a tokenizer that differs from the teacher's."""
    folder = tmp_path_factory.mktemp("other") / "student"
    tokenizer = AutoTokenizer.from_pretrained(pair[0])
    tokenizer.add_tokens(["<extra-token>"])
    model = AutoModelForCausalLM.from_pretrained(pair[0])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_token_distillation_with_two_tokenizers_is_refused_in_one_line(
    task, other_tokenizer, capsys
):
    path = task(student=str(other_tokenizer))
    capsys.readouterr()
    assert main(["init", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tokenizers differ (vocabulary" in err and "`distillation: sequence`" in err
    sequence = load_task(task(student=str(other_tokenizer), distillation="sequence"))
    assert isinstance(sequence, GenerateTaskSpec)
    assert set(check_generative_pair(sequence)) == {"student", "teacher"}  # accepted


def test_the_draft_rule_is_set_on_the_serving_scorers_scale(task, capsys):
    path = task(scorer="min_logprob")
    assert main(["init", str(path)]) == 0
    spec = load_task(path)
    report = json.loads((spec.work / "init_report.json").read_text())
    manifest = read_manifest(Registry(spec.registry_dir).path(report["student"]))
    assert manifest is not None and manifest.calibration is not None
    cut = manifest.draft_min_confidence
    confidences = manifest.calibration.confidences["min_logprob"]
    used = sum(c >= cut for c in confidences) / len(confidences)
    assert report["figures"]["drafts_used"] == pytest.approx(used)


def test_a_task_without_kind_is_a_classification_task(task, tmp_path):
    spec = yaml.safe_load(task().read_text())
    del spec["kind"]
    for field in ("traffic_limit", "batch_size", "max_new_tokens", "max_prompt_tokens"):
        spec.pop(field)
    (tmp_path / "classify.yaml").write_text(yaml.safe_dump(spec))
    assert isinstance(load_task(tmp_path / "classify.yaml"), TaskSpec)
    spec["kind"] = "translate"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(TaskError, match="'translate' is not one of"):
        load_task(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"prompt": "hi", "messages": CHATS[0]}, "needs exactly one of 'prompt'"),
        ({"other": "hi"}, "needs exactly one of 'prompt'"),
        ({"messages": "not json"}, "is text, not a JSON list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role is one of system, user"),
        ({"messages": [{"role": "user"}]}, "each message is {role, content}"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "end with the user's",
        ),
    ],
)
def test_a_bad_prompt_row_names_its_row_and_the_fix(tmp_path, row, says):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(TableError, match="row 2") as error:
        read_prompts(path)
    assert says in str(error.value)


def test_gold_rows_need_a_reference(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "fine", "reference": " "}])
    with pytest.raises(TableError, match="row 1 has no text in column 'reference'"):
        read_prompts(path, reference_column="reference")
    prompts = read_prompts(write_jsonl(tmp_path / "ok.jsonl", [{"messages": CHATS[1]}]))
    assert prompts[0].chat() == CHATS[1] and prompts[0].prompt is None
