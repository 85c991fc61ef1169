"""Draft reuse gives the teacher's greedy answer, whatever share of the draft it accepts.

The reference is the teacher's own greedy generation over the same prompts in the same
batch (left padded alike); the tiny models are float64, so batched and one-token passes
agree far beyond any near-tie.
"""

import dataclasses

import numpy as np
import pytest
import torch
from tiny_lm import build_tiny_lm

from serving.generate.draft import Verified, verify_drafts, verify_drafts_stream
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat, render_completion

MAX = 12
TOP_K = 4


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a shared machine: more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "lm"
    return load_language_model(build_tiny_lm(folder, seed=1, layers=3))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student") / "lm"
    return load_language_model(build_tiny_lm(folder, seed=2, layers=1))


@pytest.fixture(scope="module")
def prompts(teacher):
    t = teacher.tokenizer
    return [
        render_chat(t, [{"role": "user", "content": "The cat sat"}]),
        render_completion(t, "Кошка сидит"),
        render_completion(t, "猫坐在"),
        render_chat(t, [{"role": "user", "content": "A headline: markets rose today"}]),
        render_completion(t, "The dog"),
    ]


def greedy(lm, prompts, top_k=TOP_K, max_new_tokens=MAX, stop=()):
    settings = SamplingSettings(max_new_tokens=max_new_tokens, stop=stop)
    return generate_batch(lm, prompts, settings, top_k=top_k)


def changed(tokens, at):
    out = list(tokens)
    out[at] = (out[at] + 1) % 400
    return out


def assert_same_answer(verified, reference):
    assert verified.token_ids == reference.token_ids
    assert verified.text == reference.text
    assert verified.finish_reason == reference.finish_reason
    assert verified.prompt_tokens == reference.prompt_tokens
    np.testing.assert_allclose(verified.logprobs, reference.logprobs, atol=1e-9)
    if reference.top_logprobs is not None:
        assert [[i for i, _ in p] for p in verified.top_logprobs] == [
            [i for i, _ in p] for p in reference.top_logprobs
        ]
        np.testing.assert_allclose(
            [[v for _, v in p] for p in verified.top_logprobs],
            [[v for _, v in p] for p in reference.top_logprobs],
            atol=1e-9,
        )


def test_whole_draft_accepted(teacher, prompts):
    reference = greedy(teacher, prompts)
    drafts = [r.token_ids for r in reference]
    for v, r in zip(
        verify_drafts(teacher, prompts, drafts, [MAX] * 5, TOP_K), reference, strict=True
    ):
        assert_same_answer(v, r)
        assert (v.accepted, v.draft_tokens, v.accepted_share) == (MAX, MAX, 1.0)
        assert v.forward_passes == 1  # the verification pass did it all
        assert v.forward_passes_without_draft == MAX


def test_part_of_the_draft_accepted(teacher, prompts):
    reference = greedy(teacher, prompts)
    drafts = [changed(r.token_ids, 5) for r in reference]
    for v, r in zip(
        verify_drafts(teacher, prompts, drafts, [MAX] * 5, TOP_K), reference, strict=True
    ):
        assert_same_answer(v, r)
        assert (v.accepted, v.draft_tokens) == (5, MAX)
        # one pass for the 5 accepted tokens and the teacher's 6th, then one a token
        assert v.forward_passes == 1 + MAX - 6
        assert v.forward_passes_without_draft == MAX


def test_no_draft_token_accepted(teacher, prompts):
    reference = greedy(teacher, prompts)
    drafts = [changed(r.token_ids, 0) for r in reference]
    for v, r in zip(
        verify_drafts(teacher, prompts, drafts, [MAX] * 5, TOP_K), reference, strict=True
    ):
        assert_same_answer(v, r)
        assert (v.accepted, v.draft_tokens, v.accepted_share) == (0, MAX, 0.0)
        assert v.forward_passes == v.forward_passes_without_draft == MAX


def test_mixed_rows_in_one_batch(teacher, student, prompts):
    reference = greedy(teacher, prompts)
    drafts = [
        reference[0].token_ids,  # whole
        changed(reference[1].token_ids, 3)[:8],  # part, a shorter draft
        [],  # none: plain generation
        changed(reference[3].token_ids, 0),  # first token differs
        greedy(student, prompts[4:], top_k=0)[0].token_ids,  # a real student's draft
    ]
    results = verify_drafts(teacher, prompts, drafts, [MAX] * 5, TOP_K)
    for v, r in zip(results, reference, strict=True):
        assert_same_answer(v, r)
    assert [v.accepted for v in results[:4]] == [MAX, 3, 0, 0]
    assert [v.draft_tokens for v in results] == [len(d) for d in drafts]
    assert results[2].accepted_share == 1.0  # an empty draft rejects nothing


def test_a_draft_longer_than_the_budget_and_per_row_budgets(teacher, prompts):
    full = greedy(teacher, prompts)
    budgets = [4, MAX, 1, 7, 9]
    reference = [
        greedy(teacher, [p], max_new_tokens=m)[0] for p, m in zip(prompts, budgets, strict=True)
    ]
    drafts = [f.token_ids for f in full]
    drafts[1] = changed(drafts[1], 6)
    results = verify_drafts(teacher, prompts, drafts, budgets, TOP_K)
    for v, r, m in zip(results, reference, budgets, strict=True):
        assert_same_answer(v, r)
        assert len(v.token_ids) == m and v.finish_reason == "length"
    assert [v.accepted for v in results] == [4, 6, 1, 7, 9]


def test_the_teachers_eos_inside_the_draft_ends_the_answer(teacher, prompts):
    plain = greedy(teacher, prompts)
    eos = plain[0].token_ids[4]
    stopping = dataclasses.replace(teacher, eos_token_ids=frozenset({eos}))
    reference = greedy(stopping, prompts)
    assert reference[0].finish_reason == "stop"
    drafts = [p.token_ids for p in plain]  # drafts running past the teacher's EOS
    results = verify_drafts(stopping, prompts, drafts, [MAX] * 5, TOP_K)
    for v, r in zip(results, reference, strict=True):
        assert_same_answer(v, r)
    k = len(reference[0].token_ids)
    assert results[0].accepted == k and results[0].forward_passes == 1
    assert results[0].forward_passes_without_draft == k + 1  # the EOS was a choice too


def test_stop_strings_apply_to_the_teachers_answer(teacher, prompts):
    plain = greedy(teacher, prompts)
    text = plain[0].text
    i = next(i for i in range(6, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[i : i + 2]
    reference = [greedy(teacher, [p], stop=(stop,))[0] for p in prompts]
    drafts = [changed(p.token_ids, 2) for p in plain]
    results = verify_drafts(teacher, prompts, drafts, [MAX] * 5, TOP_K, stop=[[stop]] * 5)
    for v, r in zip(results, reference, strict=True):
        assert_same_answer(v, r)
    assert results[0].finish_reason == "stop" and stop not in results[0].text


def test_the_stream_adds_up_to_the_answers(teacher, prompts):
    reference = greedy(teacher, prompts, top_k=0)
    drafts = [changed(r.token_ids, a) for r, a in zip(reference, [11, 6, 0, 3, 9], strict=True)]
    texts = {i: "" for i in range(5)}
    tokens: dict[int, list[int]] = {i: [] for i in range(5)}
    results = {}
    steps = list(verify_drafts_stream(teacher, prompts, drafts, [MAX] * 5))
    for step in steps:
        for d in step:
            texts[d.row] += d.text
            tokens[d.row] += d.token_ids
            if d.result is not None:
                assert isinstance(d.result, Verified)
                results[d.row] = d.result
    for i, r in enumerate(reference):
        assert results[i].token_ids == tokens[i] == r.token_ids
        assert results[i].text == texts[i] == r.text
    # the slowest row accepts nothing: the verification step, then one step a token
    assert len(steps) == MAX


def test_inputs_are_checked(teacher, prompts):
    with pytest.raises(ValueError, match="one entry a row"):
        verify_drafts(teacher, prompts, [[]], [MAX] * 5)
    with pytest.raises(ValueError, match="vocabulary"):
        verify_drafts(teacher, prompts[:1], [[10_000]], [MAX])
    with pytest.raises(ValueError, match="at least one token"):
        verify_drafts(teacher, [[]], [[1]], [MAX])
    assert verify_drafts(teacher, [], [], []) == []
