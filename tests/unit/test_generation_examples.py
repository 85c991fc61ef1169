"""The generative job's training set, on a tiny random Llama built in the test: the
teacher's logged answers taken as they are, the missing ones generated offline (greedy,
with the record's limits and the top-k) once and cached, the pairs built for token- and
sequence-level distillation."""

from __future__ import annotations

import pytest
from test_generation_records import generation
from tiny_lm import build_tiny_lm

from distill.causal_lm import CausalExample
from distill.generation_examples import prompt_ids, training_examples
from distill.offline_answers import OfflineAnswers, TeacherText
from distill.token_kd import TopKExample
from serving.contracts.generation_records import TopKLogprobs
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model

VERSION, K, MAX_NEW = "teacher-1", 3, 6
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "stop": []}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_language_model(build_tiny_lm(tmp_path_factory.mktemp("t") / "lm", seed=1), "cpu")


def unanswered(i: int, prompt: str, **update):
    """A kept answer sampled for audit: no teacher fields."""
    fields = {
        "prompt": prompt,
        "messages": None,
        "reason": "audit",
        "teacher_status": "skipped",
        "teacher_version": None,
        "teacher_text": None,
        "teacher_top_logprobs": None,
        "draft_tokens": None,
        "draft_accepted": None,
        "sampling": SAMPLING,
    }
    return generation(i, **(fields | update))


def greedy(teacher, record):
    (answer,) = generate_batch(
        teacher, [prompt_ids(teacher.tokenizer, record)], SamplingSettings(MAX_NEW), top_k=K
    )
    return answer


def test_missing_answers_are_generated_offline_once_and_cached(teacher, tmp_path):
    audit = unanswered(1, "Markets rose today")
    logged_top = TopKLogprobs(tokens=[5, 6], ids=[[5, 7, 8], [6, 7, 8]], logprobs=[[-0.1] * 3] * 2)
    answered = generation(
        2,
        prompt="Rates fell",
        messages=None,
        teacher_version=VERSION,
        teacher_text="ab",
        teacher_top_logprobs=logged_top,
        sampling=SAMPLING,
    )
    older = generation(3, prompt="Shares slid", messages=None, teacher_version="teacher-0")
    offline = OfflineAnswers(teacher, VERSION, tmp_path, top_k=K)
    got = offline.answers([audit, answered, older])
    assert offline.asked == 2 and offline.seconds > 0  # the audit and the older teacher's
    expected = greedy(teacher, audit)
    assert got[0].text == expected.text and got[0].stopped == (expected.finish_reason == "stop")
    assert got[0].top is not None and got[0].top.tokens == expected.token_ids
    assert got[0].top.ids == [[i for i, _ in p] for p in expected.top_logprobs]
    assert got[1] == TeacherText("ab", stopped=True, top=logged_top)  # 2 tokens < 6: it stopped
    again = OfflineAnswers(teacher, VERSION, tmp_path, top_k=K)
    assert again.answers([audit, older]) == [got[0], got[2]] and again.asked == 0  # cached


def test_the_judge_gets_greedy_answers_even_for_sampled_records(teacher, tmp_path):
    sampled = generation(
        4,
        prompt="Markets rose today",
        messages=None,
        teacher_version=VERSION,
        teacher_text="whatever the sample said",
        teacher_top_logprobs=None,
        draft_tokens=None,
        draft_accepted=None,
        sampling={**SAMPLING, "temperature": 0.8},
    )
    offline = OfflineAnswers(teacher, VERSION, tmp_path, top_k=K)
    assert offline.answers([sampled])[0].text == "whatever the sample said"  # trains as logged
    assert offline.asked == 0
    assert offline.greedy([sampled])[0].text == greedy(teacher, sampled).text
    assert offline.asked == 1


def test_token_distillation_pairs_the_teachers_tokens_with_their_top_k(teacher):
    tokenizer, eos = teacher.tokenizer, teacher.tokenizer.eos_token_id
    top = TopKLogprobs(tokens=[5, 6], ids=[[5, 7, 8], [6, 7, 8]], logprobs=[[-0.1, -3, -4]] * 2)
    record = generation(5, prompt="Rates fell", messages=None)
    stopped, cut = TeacherText("ab", True, top), TeacherText("ab", False, top)
    (example, truncated) = training_examples([record, record], [stopped, cut], tokenizer, "token")
    assert isinstance(example, TopKExample)
    assert example.prompt_ids == prompt_ids(tokenizer, record)
    assert list(example.answer_ids) == [5, 6, eos] and example.top_ids == top.ids
    assert list(truncated.answer_ids) == [5, 6]  # cut at its limit: no end of turn
    text_only = training_examples([record], [TeacherText("the cat", True)], tokenizer, "token")
    assert type(text_only[0]) is CausalExample  # no top-k: its text, cross-entropy only
    assert list(text_only[0].answer_ids) == tokenizer("the cat", add_special_tokens=False)[
        "input_ids"
    ] + [eos]


def test_sequence_distillation_trains_on_the_text_in_the_students_tokens(teacher):
    tokenizer, eos = teacher.tokenizer, teacher.tokenizer.eos_token_id
    top = TopKLogprobs(tokens=[5], ids=[[5, 7, 8]], logprobs=[[-0.1, -3, -4]])
    record = generation(6, prompt="Rates fell", messages=None)
    (example,) = training_examples(
        [record], [TeacherText("the cat", True, top)], tokenizer, "sequence"
    )
    assert type(example) is CausalExample
    assert list(example.answer_ids) == tokenizer("the cat", add_special_tokens=False)[
        "input_ids"
    ] + [eos]
    empty = training_examples([record], [TeacherText("", False)], tokenizer, "sequence")
    assert empty == []  # nothing to learn from


def test_an_answer_cut_by_a_stop_string_does_not_teach_the_end_of_turn(teacher, tmp_path):
    top = TopKLogprobs(tokens=[5, 6], ids=[[5, 7, 8], [6, 7, 8]], logprobs=[[-0.1] * 3] * 2)
    fields = {"prompt": "Rates fell", "messages": None, "teacher_version": VERSION}
    plain = generation(7, **fields, teacher_text="ab", teacher_top_logprobs=top, sampling=SAMPLING)
    cut = generation(
        8,
        **fields,
        teacher_text="ab",
        teacher_top_logprobs=top,
        sampling={**SAMPLING, "stop": ["\n"]},
    )
    offline = OfflineAnswers(teacher, VERSION, tmp_path, top_k=K)
    assert [a.stopped for a in offline.answers([plain, cut])] == [True, False]
    audit = unanswered(9, "Markets rose today", sampling={**SAMPLING, "stop": ["zzz"]})
    (answer,) = offline.answers([audit])  # generated offline with the client's stop string
    assert not answer.stopped
