"""A repeatable default build: each model is made from a seeded generator and trained on a
fixed number of threads, so two builds give the same weights."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from protege import bbc
from protege.default_models import (
    PROFILES,
    _base_student,
    _base_teacher,
    _train_model,
    build_defaults,
    fixed_threads,
)

LITE = PROFILES["lite"]
EXAMPLES = [
    bbc.Example(text=f"{topic} headline number {i}", label=topic, kind="headline", article="x")
    for i, topic in enumerate(bbc.LABELS)
]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert different == []


def test_a_model_is_made_and_trained_the_same_whatever_torchs_state_before(tmp_path):
    settings = dataclasses.replace(LITE.student, epochs=1, batch_size=5, max_tokens=16)
    built = []
    for attempt in range(2):
        torch.manual_seed(1000 + attempt)  # whatever ran before the build
        torch.rand(attempt + 1)
        with fixed_threads(LITE.threads):
            model, tokenizer = _base_student(LITE)
            target = tmp_path / f"student-{attempt}"
            _train_model(
                "student", target, model, tokenizer, EXAMPLES, settings, torch.device("cpu")
            )
        built.append(weights(target))
    assert_same(*built)


def test_the_teachers_new_head_is_seeded_before_from_pretrained(tmp_path):
    heads = []
    for attempt in range(2):
        torch.manual_seed(2000 + attempt)
        model, _ = _base_teacher(LITE, tmp_path)
        heads.append({k: v for k, v in model.state_dict().items() if "classifier" in k})
    assert heads[0] and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_the_thread_count_is_fixed_for_the_build_and_restored_after():
    before = torch.get_num_threads()
    with fixed_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


@pytest.mark.slow
def test_two_lite_builds_give_equal_weights(lite_cache, tmp_path):
    again = build_defaults(tmp_path / "cache", "lite", device="cpu")
    for role in ("teacher", "student"):
        assert_same(
            weights(lite_cache / "models" / role), weights(tmp_path / "cache" / "models" / role)
        )
    first = build_defaults(lite_cache, "lite", device="cpu")  # the report, as written
    assert again["figures"] == first["figures"]  # the same thresholds and accuracies
