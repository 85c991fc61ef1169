"""The teacher engine in process: concurrent calls share one static batch, greedy rows
start from their drafts and give the teacher's greedy answer, sampled rows generate from
scratch, a prompt in another tokenizer's ids is rendered afresh, and a failing or
abandoned call never holds up the others."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from tiny_lm import build_tiny_lm

from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat, render_completion
from serving.generate.teacher_engine import (
    LocalTeacher,
    TeacherChunk,
    TeacherDone,
    TeacherEngine,
    TeacherRequest,
    tokenizer_digest,
)

MAX = 10
MESSAGES = [{"role": "user", "content": "Markets rose today"}]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = build_tiny_lm(tmp_path_factory.mktemp("teacher") / "lm", seed=1, layers=2)
    return load_language_model(folder, device="cpu")


@pytest.fixture
def engine(lm):
    return TeacherEngine(lm, "teacher-1", max_batch_size=8, wait_s=0.0)


def greedy(lm, prompt, k=0):
    return generate_batch(lm, [prompt], SamplingSettings(max_new_tokens=MAX), top_k=k)[0]


async def answer(client, request):
    chunks, done = [], None
    async for item in client.stream(request):
        if isinstance(item, TeacherChunk):
            chunks.append(item)
        else:
            assert done is None
            done = item
    assert isinstance(done, TeacherDone)
    return chunks, done


def changed(tokens, at):
    out = list(tokens)
    out[at] = 3 + (out[at] + 1) % 300
    return out


def test_concurrent_calls_share_a_batch_and_start_from_their_drafts(engine, lm):
    prompts = [
        render_chat(lm.tokenizer, MESSAGES),
        render_completion(lm.tokenizer, "The cat sat"),
        render_completion(lm.tokenizer, "Кошка сидит"),
        render_completion(lm.tokenizer, "The dog ate"),
    ]
    references = [greedy(lm, p, k=3) for p in prompts]
    drafts = [
        references[0].token_ids,  # whole
        changed(references[1].token_ids, 4),  # part
        changed(references[2].token_ids, 0),  # none
        None,  # plain generation
    ]
    sampled = SamplingSettings(max_new_tokens=MAX, temperature=0.9, seed=11)
    requests = [
        TeacherRequest(
            settings=SamplingSettings(max_new_tokens=MAX),
            prompt="unused",
            prompt_ids=p,
            ids_digest=engine.digest,
            draft_ids=d,
            top_k=3,
            text_top_k=2,
        )
        for p, d in zip(prompts, drafts, strict=True)
    ]
    requests.append(
        TeacherRequest(
            settings=sampled, prompt="x", prompt_ids=prompts[3], ids_digest=engine.digest
        )
    )
    client = LocalTeacher(engine)

    async def scenario():
        return await asyncio.gather(*(answer(client, r) for r in requests))

    results = asyncio.run(scenario())
    assert engine.batch_sizes == [5]  # one static batch for all five calls
    for (chunks, done), reference in zip(results[:4], references, strict=True):
        assert "".join(c.text for c in chunks) == reference.text
        assert [t for c in chunks for t in c.token_ids] == reference.token_ids
        assert [t for c in chunks for t in c.logprobs] == pytest.approx(reference.logprobs)
        top = [p for c in chunks for p in c.top_logprobs]
        assert [[i for i, _ in p] for p in top] == [
            [i for i, _ in p] for p in reference.top_logprobs
        ]
        tokens = [t for c in chunks for t in c.tokens]
        assert tokens == [lm.tokenizer.decode([t]) for t in reference.token_ids]
        assert all(len(names) == 2 for c in chunks for names in c.top_tokens)
        assert (done.finish_reason, done.completion_tokens, done.version) == (
            reference.finish_reason,
            reference.completion_tokens,
            "teacher-1",
        )
    dones = [done for _, done in results]
    assert [d.accepted for d in dones[:4]] == [references[0].completion_tokens, 4, 0, None]
    assert [d.draft_tokens for d in dones[:4]] == [len(d) for d in drafts[:3]] + [None]
    assert dones[0].forward_passes == 1
    assert dones[2].seconds_saved is not None and dones[2].seconds_saved <= 0  # all rejected
    own = generate_batch(lm, [prompts[3]], sampled)[0]
    assert "".join(c.text for c in results[4][0]) == own.text  # seeded: the same sample
    assert dones[4].draft_tokens is None and dones[4].forward_passes is None


def test_ids_of_another_tokenizer_are_rendered_afresh_and_the_draft_ignored(engine, lm):
    prompt = render_chat(lm.tokenizer, MESSAGES)
    reference = greedy(lm, prompt)
    request = TeacherRequest(
        settings=SamplingSettings(max_new_tokens=MAX),
        messages=MESSAGES,
        prompt_ids=[5, 6, 7],  # another tokenizer's ids mean nothing here
        ids_digest="another tokenizer",
        draft_ids=[8, 9],
    )
    chunks, done = asyncio.run(answer(LocalTeacher(engine), request))
    assert "".join(c.text for c in chunks) == reference.text
    assert done.draft_tokens is None and done.prompt_tokens == len(prompt)
    assert chunks[0].tokens is None and chunks[0].top_logprobs is None  # nothing asked


def test_a_prompt_beyond_the_window_fails_its_call_only(engine, lm):
    window = lm.model.config.max_position_embeddings
    long = TeacherRequest(
        settings=SamplingSettings(max_new_tokens=MAX),
        prompt="x",
        prompt_ids=[5] * (window - 2),
        ids_digest=engine.digest,
    )
    fine = TeacherRequest(settings=SamplingSettings(max_new_tokens=MAX), prompt="The cat sat")
    client = LocalTeacher(engine)

    async def scenario():
        return await asyncio.gather(
            answer(client, long), answer(client, fine), return_exceptions=True
        )

    failed, (chunks, done) = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and "window" in str(failed)
    assert done.completion_tokens == len([t for c in chunks for t in c.token_ids])


def test_an_abandoned_call_ends_its_batch_and_the_next_is_answered(engine, lm):
    prompt = render_completion(lm.tokenizer, "The cat sat")
    request = TeacherRequest(settings=SamplingSettings(max_new_tokens=MAX), prompt="The cat sat")
    client = LocalTeacher(engine)

    async def scenario():
        items = client.stream(request)
        async with contextlib.aclosing(items):
            first = await anext(items)
        return first, await answer(client, request)

    first, (chunks, _) = asyncio.run(scenario())
    assert isinstance(first, TeacherChunk)
    assert "".join(c.text for c in chunks) == greedy(lm, prompt).text
    assert engine.batch_sizes == [1, 1]


def test_the_tokenizer_digest_tells_tokenizers_apart(lm, tmp_path):
    same = load_language_model(build_tiny_lm(tmp_path / "other", seed=5, layers=1), "cpu")
    assert tokenizer_digest(same.tokenizer) == tokenizer_digest(lm.tokenizer)
    plain = load_language_model(
        build_tiny_lm(tmp_path / "plain", seed=5, layers=1, template=False), "cpu"
    )
    assert tokenizer_digest(plain.tokenizer) != tokenizer_digest(lm.tokenizer)
    info = asyncio.run(LocalTeacher(TeacherEngine(lm, "v")).info())
    assert info.tokenizer_digest == tokenizer_digest(lm.tokenizer) and info.verifies_drafts
    assert info.version == "v"


def test_a_request_names_exactly_one_prompt():
    with pytest.raises(ValueError, match="exactly one"):
        TeacherRequest(settings=SamplingSettings(), prompt="a", messages=MESSAGES)
    with pytest.raises(ValueError, match="exactly one"):
        TeacherRequest(settings=SamplingSettings())
