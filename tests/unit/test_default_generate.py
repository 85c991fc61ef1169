"""The generative default build, end to end on a tiny random teacher in place of SmolLM2
(the BBC prompts are real): roles that never leak, a registered and calibrated seed student,
a resumable build. The real-weights run is the slow test at the end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lm import build_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from distill.causal_lm import CausalTrainSettings
from distill.greedy import accepted_share
from protege import headline_task
from protege.default_generate import (
    PROFILES,
    GenerateProfile,
    assign,
    build_generate,
    tune_teacher,
)
from protege.smollm2 import evenly_spaced, keep_layers
from serving.contracts.manifest import read_manifest
from serving.contracts.registry import Registry
from serving.generate.scorers import SCORERS

TINY = GenerateProfile(
    student_layers=2,
    tune_prompts=8,
    dev_prompts=6,
    seed_prompts=8,
    traffic_prompts=12,
    gold_prompts=6,
    teacher_tune=CausalTrainSettings(epochs=1, batch_size=4, lr=1e-3),
    student=CausalTrainSettings(epochs=1, batch_size=4, lr=1e-3),
    threads=1,
    max_new_tokens=6,
    single_prompts=2,
)


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a shared machine: more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_teacher(folder: Path, layers: int = 4) -> Path:
    """A random Llama with a chat template, long enough a window for article openings."""
    tokenizer = build_tokenizer()
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    cache = tmp_path_factory.mktemp("cache")
    tiny_teacher(cache / "generate" / "models" / "teacher-base")  # stands in for the GGUF
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = build_generate(cache, TINY, device="cpu")
    finally:
        torch.set_num_threads(before)
    return cache / "generate", report


def articles(path: Path) -> set[str]:
    return {row["article"] for row in headline_task.read_prompts(path)}


def test_no_article_a_model_trained_on_is_measured_or_calibrated_on(built):
    root, _ = built
    data = root / "data"
    trained = articles(data / "tune.jsonl") | articles(data / "seed.jsonl")
    for held in ("dev.jsonl", "traffic.jsonl", "gold.jsonl", "stream.jsonl"):
        assert not trained & articles(data / held), held
    assert not articles(data / "stream.jsonl") & (
        articles(data / "traffic.jsonl") | articles(data / "gold.jsonl")
    )
    gold = headline_task.read_prompts(data / "gold.jsonl")
    assert all(row["reference"] and row["messages"][0]["role"] == "user" for row in gold)
    assert "reference" not in headline_task.read_prompts(data / "traffic.jsonl")[0]


def test_the_seed_student_is_calibrated_registered_and_current(built):
    root, report = built
    manifest = read_manifest(root / "models" / "student")
    assert manifest is not None
    assert manifest.kind == "generate" and manifest.role == "student"
    assert manifest.agreement_cut == TINY.agreement_cut
    assert manifest.max_new_tokens == TINY.max_new_tokens
    assert manifest.max_prompt_tokens == TINY.max_prompt_tokens
    assert manifest.draft_min_confidence is not None
    calibration = manifest.calibration
    assert calibration is not None
    assert set(calibration.confidences) == set(SCORERS)
    assert len(calibration.agrees_with_teacher) == TINY.traffic_prompts
    registry = Registry(root / "registry")
    assert registry.current() == manifest.version == report["student"]
    assert read_manifest(registry.path(manifest.version)) == manifest
    teacher = read_manifest(root / "models" / "teacher")
    assert teacher is not None and teacher.kind == "generate" and teacher.role == "teacher"


def test_the_build_writes_a_serve_config_that_the_gateway_builder_accepts(built):
    import yaml

    from serving.app import check_generate, load_config

    root, report = built
    path = Path(report["serve_config"])
    assert path == root / "serve_config.yaml"
    (app,) = yaml.safe_load(path.read_text())["applications"]
    config = load_config(app["args"])
    assert config.generate is not None and config.student is None  # no classification build here
    assert str(config.generate.registry) == str((root / "registry").resolve())
    check_generate(config.generate)  # the folders, the chat template, the threshold rule


def test_the_build_writes_the_distillation_config_of_its_cascade(built):
    from distill.config import load_distill_config
    from distill.generate_config import GenerateDistillConfig
    from distill.prompts import read_prompts

    root, report = built
    config = load_distill_config(Path(report["distill_config"]))
    assert isinstance(config, GenerateDistillConfig)
    assert str(config.registry) == str((root / "registry").resolve())
    assert str(config.log_dir) == str((root / "generations").resolve())  # the served log
    assert config.traffic is not None and read_prompts(config.traffic)  # prompts it can read
    assert config.gold is not None and read_prompts(config.gold, reference_column="reference")


def test_the_student_keeps_evenly_spaced_layers_of_the_teacher(built):
    root, report = built
    assert report["student_seed"]["layers_kept"] == [0, 3]
    config = json.loads((root / "models" / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2


def test_the_served_teacher_is_the_fine_tune_only_when_it_was_kept(built):
    root, report = built
    served = load_file(root / "models" / "teacher" / "model.safetensors")
    base = load_file(root / "models" / "teacher-base" / "model.safetensors")
    same = all(torch.equal(served[k], base[k]) for k in base)
    assert same != report["teacher_fine_tune"]["kept"]


def test_the_report_holds_the_plan_the_figures_and_each_stages_time(built):
    _, report = built
    assert report["plan"]["prompts"] == {
        "tune": 8,
        "dev": 6,
        "seed": 8,
        "traffic": 12,
        "gold": 6,
    }
    gold = report["gold"]
    for role in ("teacher", "student"):
        assert 0 <= gold[role]["gold_rouge_l"] <= 1
        assert gold[role]["tokens_per_s_alone"] > 0
    low, high = gold["teacher_minus_student_gold_rouge_l"]["interval_95"]
    assert low <= gold["teacher_minus_student_gold_rouge_l"]["mean"] <= high
    assert set(report["seconds"]) >= {"teacher fine-tune", "student seed", "calibrate", "total"}


def test_a_finished_build_is_not_redone(built):
    root, report = built
    stamp = (root / "models" / "student" / "model.safetensors").stat().st_mtime_ns
    assert build_generate(root.parent, TINY, device="cpu") == report
    assert (root / "models" / "student" / "model.safetensors").stat().st_mtime_ns == stamp


def test_a_fine_tune_that_changes_nothing_is_refused_and_the_base_served(tmp_path):
    base = tiny_teacher(tmp_path / "base", layers=2)
    prompts = headline_task.headline_prompts()["train"]
    idle = dataclasses.replace(TINY, teacher_tune=CausalTrainSettings(batch_size=4, lr=0.0))
    tune_teacher(base, tmp_path / "teacher", prompts[:4], prompts[4:8], idle, "cpu")
    info = json.loads((tmp_path / "teacher" / "build.json").read_text())
    assert not info["kept"] and info["dev_before"] == info["dev_after"]
    assert (tmp_path / "teacher" / "model.safetensors").read_bytes() == (
        base / "model.safetensors"
    ).read_bytes()


def test_seed_prompts_beyond_the_seed_split_come_from_unused_train_articles():
    prompts = headline_task.headline_prompts()
    seeds = len(prompts["seed"])
    roles = assign(prompts, dataclasses.replace(TINY, seed_prompts=seeds + 5))
    assert len(roles["seed"]) == seeds + 5
    top_up = {p.article for p in roles["seed"][seeds:]}
    assert top_up <= {p.article for p in prompts["train"]}
    for role in ("tune", "dev", "traffic", "traffic_file", "gold", "stream"):
        assert not top_up & {p.article for p in roles[role]}, role


def test_a_profile_needing_more_articles_than_exist_is_refused():
    prompts = headline_task.headline_prompts()
    with pytest.raises(ValueError, match="train articles"):
        assign(prompts, dataclasses.replace(TINY, seed_prompts=10_000))


def test_pruning_keeps_the_chosen_layers_and_everything_else(tmp_path):
    teacher = LlamaForCausalLM.from_pretrained(tiny_teacher(tmp_path / "t", layers=4))
    pruned = keep_layers(teacher, [1, 3])
    assert pruned.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for new, old in enumerate([1, 3]):
        mine, theirs = pruned.model.layers[new].state_dict(), teacher.model.layers[old].state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
        assert pruned.model.layers[new].self_attn.layer_idx == new  # its cache slot
    assert torch.equal(pruned.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(pruned.model.norm.weight, teacher.model.norm.weight)
    out = pruned.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)
    with pytest.raises(ValueError):
        keep_layers(teacher, [3, 1])


def test_evenly_spaced_layers_include_the_first_and_the_last():
    assert evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced(30, 15)[0] == 0 and evenly_spaced(30, 15)[-1] == 29
    assert len(evenly_spaced(30, 15)) == 15
    assert evenly_spaced(4, 2) == [0, 3]
    with pytest.raises(ValueError):
        evenly_spaced(4, 5)


def test_the_accepted_share_is_the_common_prefix_of_the_draft():
    assert accepted_share([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert accepted_share([1, 2, 3, 4], [1, 2, 9]) == 0.5
    assert accepted_share([1, 2], [1, 2, 3]) == 1.0  # the teacher goes on: all of it kept
    assert accepted_share([5], [1]) == 0.0
    assert accepted_share([], [1]) == 0.0


def test_an_opening_is_whole_sentences_up_to_the_word_budget():
    body = "\nFirst sentence has five words. Second one here. " + "Long " * 80 + "end."
    assert (
        headline_task.opening_of(body, words=8) == "First sentence has five words. Second one here."
    )
    assert headline_task.opening_of(body, words=2) == "First sentence has five words."


@pytest.mark.slow
def test_the_lite_profile_on_the_real_smollm2(tmp_path):
    """The same code path on SmolLM2-135M-Instruct from its wheel (minutes on 2 shared
    cores): the teacher answers gold prompts better than the 3-layer seed student."""
    report = build_generate(tmp_path, "lite", device="cpu")
    gold = report["gold"]
    assert gold["prompts"] == PROFILES["lite"].gold_prompts
    assert gold["teacher"]["gold_rouge_l"] > gold["student"]["gold_rouge_l"]
    assert Registry(tmp_path / "generate" / "registry").current() == report["student"]


def test_the_command_is_wired():
    from protege.cli import parser

    args = parser().parse_args(["models", "build-generate", "--cache", "x", "--profile", "lite"])
    assert args.func.__name__ == "_models_build_generate"
    assert (args.cache, args.profile, args.device) == (Path("x"), "lite", "auto")
