"""The generative teacher deployed alone on Ray Serve, streamed from through its handle:
the same answers as the model in process, the draft reused across the hop, concurrent
calls in one batch, and an abandoned stream that holds nothing up."""

import asyncio
import contextlib

import pytest
from tiny_lm import build_tiny_lm

from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat, render_completion
from serving.generate.teacher_engine import TeacherChunk, TeacherDone, TeacherRequest

pytestmark = pytest.mark.integration
MAX = 10
APP = "generate-teacher"


async def answer(client, request):
    chunks, done = [], None
    async for item in client.stream(request):
        if isinstance(item, TeacherChunk):
            chunks.append(item)
        else:
            done = item
    assert isinstance(done, TeacherDone)
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], done


def test_the_teacher_deployment_streams_through_its_handle(serve_cluster, tmp_path):
    from ray import serve

    from serving.config_sections import BatchingConfig
    from serving.generate.teacher import GenerativeTeacher, HandleTeacher

    folder = build_tiny_lm(tmp_path / "teacher", seed=1, layers=2)
    batching = BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.05)
    app = GenerativeTeacher.bind(str(folder), batching, "cpu", 1)
    handle = serve.run(app, name=APP, route_prefix=None)
    try:
        lm = load_language_model(folder, device="cpu")
        prompts = [
            render_chat(lm.tokenizer, [{"role": "user", "content": "The cat sat"}]),
            render_completion(lm.tokenizer, "Markets rose today"),
            render_completion(lm.tokenizer, "Кошка сидит"),
        ]
        settings = SamplingSettings(max_new_tokens=MAX)
        references = [generate_batch(lm, [p], settings)[0] for p in prompts]
        part = list(references[1].token_ids)
        part[3] = 3 + (part[3] + 1) % 300
        client = HandleTeacher(handle)

        async def scenario():
            info = await client.info()
            drafts = [references[0].token_ids, part, None]
            requests = [
                TeacherRequest(
                    settings=settings,
                    prompt="unused",
                    prompt_ids=p,
                    ids_digest=info.tokenizer_digest,
                    draft_ids=d,
                    top_k=4,
                )
                for p, d in zip(prompts, drafts, strict=True)
            ]
            results = await asyncio.gather(*(answer(client, r) for r in requests))
            items = client.stream(requests[2])
            async with contextlib.aclosing(items):
                first = await anext(items)  # then the caller goes away
            again = await answer(client, requests[2])
            return info, results, first, again

        info, results, first, again = asyncio.run(scenario())
        assert info.verifies_drafts and info.version
        for (text, tokens, done), reference in zip(results, references, strict=True):
            assert (text, tokens) == (reference.text, reference.token_ids)
            assert done.completion_tokens == reference.completion_tokens
            assert done.version == info.version
        accepted = [done.accepted for _, _, done in results]
        assert accepted == [references[0].completion_tokens, 3, None]
        assert isinstance(first, TeacherChunk)
        assert again[0] == references[2].text
    finally:
        serve.delete(APP)
