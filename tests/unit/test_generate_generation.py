import dataclasses

import numpy as np
import pytest
import torch
from tiny_lm import build_tiny_lm

from serving.generate.generation import (
    SamplingSettings,
    generate_batch,
    generate_stream,
)
from serving.generate.models import load_language_model, render_chat, render_completion

GREEDY = SamplingSettings(max_new_tokens=12)


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a shared machine: more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_language_model(build_tiny_lm(tmp_path_factory.mktemp("lm") / "lm", seed=1))


@pytest.fixture(scope="module")
def prompts(lm):
    t = lm.tokenizer
    return [
        render_chat(t, [{"role": "user", "content": "The cat sat"}]),
        render_completion(t, "Кошка сидит"),
        render_completion(t, "猫坐在"),
        render_chat(
            t,
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Markets rose today"},
            ],
        ),
    ]


def teacher_forced(lm, prompt, answer):
    """Log-softmax of the raw logits at each answer position, from one unpadded pass."""
    ids = torch.tensor([[*prompt, *answer]], device=lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1 : -1].double(), dim=-1).cpu()


def test_batched_greedy_equals_one_prompt_at_a_time(lm, prompts):
    batched = generate_batch(lm, prompts, GREEDY)
    for prompt, answer in zip(prompts, batched, strict=True):
        (alone,) = generate_batch(lm, [prompt], GREEDY)
        assert answer.token_ids == alone.token_ids
        np.testing.assert_allclose(answer.logprobs, alone.logprobs, atol=1e-9)
        assert answer.prompt_tokens == len(prompt)


def test_greedy_tokens_and_logprobs_match_a_teacher_forced_pass(lm, prompts):
    for prompt, answer in zip(prompts, generate_batch(lm, prompts, GREEDY, top_k=5), strict=True):
        assert answer.finish_reason == "length" and len(answer.token_ids) == 12
        logp = teacher_forced(lm, prompt, answer.token_ids)
        assert answer.token_ids == logp.argmax(dim=-1).tolist()
        chosen = logp.gather(1, torch.tensor(answer.token_ids)[:, None])[:, 0]
        np.testing.assert_allclose(answer.logprobs, chosen.numpy(), atol=1e-9)
        top_values, top_ids = logp.topk(5, dim=-1)
        assert [[i for i, _ in pos] for pos in answer.top_logprobs] == top_ids.tolist()
        np.testing.assert_allclose(
            [[v for _, v in pos] for pos in answer.top_logprobs], top_values.numpy(), atol=1e-9
        )
        assert answer.text == lm.tokenizer.decode(answer.token_ids)


def test_each_row_has_its_own_settings(lm, prompts):
    settings = [
        SamplingSettings(max_new_tokens=3),
        SamplingSettings(max_new_tokens=12, temperature=1.0, seed=5),
        SamplingSettings(max_new_tokens=7, temperature=0.7, top_p=0.9, seed=6),
        SamplingSettings(max_new_tokens=12),
    ]
    answers = generate_batch(lm, prompts, settings)
    for answer, s in zip(answers, settings, strict=True):  # a sampled row may meet its EOS
        assert len(answer.token_ids) <= s.max_new_tokens
        assert (answer.finish_reason == "length") == (len(answer.token_ids) == s.max_new_tokens)
    greedy = generate_batch(lm, prompts, GREEDY)
    # the greedy rows are the greedy answers, whatever their neighbours sample
    assert answers[0].token_ids == greedy[0].token_ids[:3]
    assert answers[3].token_ids == greedy[3].token_ids
    # the sampled rows' logprobs are still the raw distribution's
    for prompt, answer in zip(prompts[1:3], answers[1:3], strict=True):
        logp = teacher_forced(lm, prompt, answer.token_ids)
        chosen = logp.gather(1, torch.tensor(answer.token_ids)[:, None])[:, 0]
        np.testing.assert_allclose(answer.logprobs, chosen.numpy(), atol=1e-9)


def test_a_seed_repeats_the_sample(lm, prompts):
    s = SamplingSettings(max_new_tokens=12, temperature=1.5, seed=11)
    first = generate_batch(lm, prompts, s)
    again = generate_batch(lm, prompts, s)
    assert [a.token_ids for a in first] == [a.token_ids for a in again]
    other = generate_batch(lm, prompts, dataclasses.replace(s, seed=12))
    assert [a.token_ids for a in first] != [a.token_ids for a in other]


def test_sampling_follows_the_model_distribution(lm, prompts):
    """400 seeded rows of one prompt, one token each: the first token's frequencies
    follow exp(logprob) at temperature 1 (a chi-square bound far in the tail)."""
    n = 400
    settings = [SamplingSettings(max_new_tokens=1, temperature=1.0, seed=s) for s in range(n)]
    answers = generate_batch(lm, [prompts[0]] * n, settings)
    logp = teacher_forced(lm, prompts[0], [0])[0].numpy()
    expected = np.exp(logp)
    top = np.argsort(expected)[::-1][:5]
    counts = np.bincount([a.token_ids[0] for a in answers], minlength=expected.size)
    observed = np.append(counts[top], n - counts[top].sum())
    wanted = n * np.append(expected[top], 1 - expected[top].sum())
    chi2 = ((observed - wanted) ** 2 / wanted).sum()
    assert chi2 < 25  # 5 degrees of freedom: p < 2e-4
    for a in answers:  # every sampled token carries its own raw log-probability
        assert a.logprobs[0] == pytest.approx(logp[a.token_ids[0]], abs=1e-9)


def test_top_p_samples_only_inside_the_nucleus(lm, prompts):
    logp = teacher_forced(lm, prompts[0], [0])[0].numpy()
    p = np.exp(logp)
    order = np.argsort(p)[::-1]
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.2)) + 1].tolist())
    settings = [
        SamplingSettings(max_new_tokens=1, temperature=1.0, top_p=0.2, seed=s) for s in range(100)
    ]
    seen = {a.token_ids[0] for a in generate_batch(lm, [prompts[0]] * 100, settings)}
    assert seen <= nucleus
    # a tiny nucleus is the top token alone: greedy
    tiny = SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=1)
    assert (
        generate_batch(lm, prompts, tiny)[0].token_ids
        == generate_batch(lm, prompts, GREEDY)[0].token_ids
    )


def test_eos_ends_a_row_and_is_not_part_of_the_answer(lm, prompts):
    (full,) = generate_batch(lm, prompts[:1], GREEDY)
    eos = full.token_ids[2]
    at = full.token_ids.index(eos)
    stopping = dataclasses.replace(lm, eos_token_ids=frozenset({eos}))
    answers = generate_batch(stopping, prompts, GREEDY)
    assert answers[0].token_ids == full.token_ids[:at]
    assert answers[0].finish_reason == "stop"
    assert len(answers[0].logprobs) == at


def test_finished_rows_stop_taking_part(lm, prompts):
    settings = [SamplingSettings(max_new_tokens=m) for m in (1, 4, 12, 2)]
    stream = generate_stream(lm, prompts, settings)
    steps = list(stream)
    assert len(steps) == 12  # one step a token of the longest row
    finished = {d.row: i for i, step in enumerate(steps) for d in step if d.finish_reason}
    assert finished == {0: 0, 1: 3, 2: 11, 3: 1}
    # no row appears after its last delta
    for i, step in enumerate(steps):
        assert all(i <= finished[d.row] for d in step)


def stop_case(lm, prompts):
    """A stop string taken from the middle of a greedy answer, with its expected cut."""
    (full,) = generate_batch(lm, prompts[:1], GREEDY)
    text = full.text
    i = next(i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    stop = text[i : i + 2]
    return full, stop, text[: text.find(stop)]


def test_a_stop_string_cuts_text_and_tokens(lm, prompts):
    full, stop, expected = stop_case(lm, prompts)
    (answer,) = generate_batch(
        lm, prompts[:1], SamplingSettings(max_new_tokens=12, stop=["never there", stop]), top_k=2
    )
    assert answer.finish_reason == "stop"
    assert answer.text == expected
    k = len(answer.token_ids)
    assert answer.token_ids == full.token_ids[:k]
    # the kept tokens are the fewest that cover the text
    decode = lm.tokenizer.decode
    assert decode(full.token_ids[:k]).startswith(expected)
    assert k == 0 or len(decode(full.token_ids[: k - 1])) < len(expected)
    assert len(answer.logprobs) == len(answer.top_logprobs) == k


def test_a_stop_string_at_the_start_gives_an_empty_answer(lm, prompts):
    (full,) = generate_batch(lm, prompts[:1], GREEDY)
    (answer,) = generate_batch(lm, prompts[:1], SamplingSettings(stop=[full.text[:1]]))
    assert (answer.text, answer.token_ids, answer.finish_reason) == ("", [], "stop")


@pytest.mark.parametrize("with_stop", [False, True])
def test_stream_deltas_add_up_to_the_result(lm, prompts, with_stop):
    _, stop, _ = stop_case(lm, prompts)
    settings = SamplingSettings(max_new_tokens=12, stop=[stop] if with_stop else [])
    texts = {i: "" for i in range(len(prompts))}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    results = {}
    for step in generate_stream(lm, prompts, settings, top_k=3):
        for d in step:
            assert d.row not in results  # nothing after the last delta
            texts[d.row] += d.text
            tokens[d.row] += d.token_ids
            assert len(d.logprobs) == len(d.top_logprobs) == len(d.token_ids)
            if d.result is not None:
                results[d.row] = d.result
                assert d.finish_reason == d.result.finish_reason
            assert stop not in texts[d.row] or not with_stop
    assert sorted(results) == list(range(len(prompts)))
    for i, r in results.items():
        assert texts[i] == r.text and tokens[i] == r.token_ids
    assert [r.token_ids for r in results.values()] == [
        g.token_ids for g in generate_batch(lm, prompts, settings)
    ]


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSettings(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(top_p=0)
    with pytest.raises(ValueError, match="stop"):
        SamplingSettings(stop=[""])
    assert SamplingSettings(stop="x").stop == ("x",)


def test_prompts_and_settings_must_match(lm, prompts):
    with pytest.raises(ValueError, match="sampling settings"):
        generate_batch(lm, prompts, [GREEDY])
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(lm, [[]], GREEDY)
    assert generate_batch(lm, [], GREEDY) == []
