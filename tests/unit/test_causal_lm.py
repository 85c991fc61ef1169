"""The causal-LM training path: loss on the answer positions only, padding ignored, the
loss falls, runs repeat; on a tiny random Llama built here (seconds)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distill.causal_lm import (
    CausalExample,
    CausalTrainSettings,
    batch_loss,
    collate,
    train_causal_lm,
)

VOCAB, PAD = 48, 0
EXAMPLES = [
    CausalExample(prompt_ids=[5, 6, 7, 8, 9, 10], answer_ids=[20, 21, 2]),
    CausalExample(prompt_ids=[11, 12], answer_ids=[22, 23, 24, 25, 2]),
    CausalExample(prompt_ids=[13, 14, 15, 16], answer_ids=[26, 2]),
]


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model on a shared machine: more threads only wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def reference_loss(model: LlamaForCausalLM, examples: list[CausalExample]) -> torch.Tensor:
    """Each example alone, unpadded, every position's logits; CE over the answer's tokens."""
    logits, targets = [], []
    for e in examples:
        ids = torch.tensor([list(e.prompt_ids) + list(e.answer_ids)])
        full = model(input_ids=ids).logits[0]
        p = len(e.prompt_ids)
        logits.append(full[p - 1 : p - 1 + len(e.answer_ids)])
        targets.append(torch.tensor(list(e.answer_ids)))
    return F.cross_entropy(torch.cat(logits), torch.cat(targets))


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_loss_is_the_cross_entropy_of_the_answer_tokens_alone(side):
    model = tiny_llama()
    with torch.no_grad():
        got = batch_loss(model, EXAMPLES, PAD, side)
        want = reference_loss(model, EXAMPLES)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_answer_positions_are_kept_and_padding_changes_nothing():
    batch = collate(EXAMPLES, PAD, "left")
    assert int(batch.keep.sum()) == sum(len(e.answer_ids) for e in EXAMPLES)
    assert batch.targets.tolist() == [t for e in EXAMPLES for t in e.answer_ids]
    model = tiny_llama()
    with torch.no_grad():
        losses = [
            batch_loss(model, EXAMPLES, pad, side) for pad in (0, 47) for side in ("left", "right")
        ]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=1e-5, atol=1e-5)


def test_a_prompt_token_is_context_never_a_target():
    """Changing the last prompt token changes the answer's logits (it is read) but no
    position predicting it is in the loss: the batch's targets stay the answer's."""
    changed = [dataclasses.replace(EXAMPLES[0], prompt_ids=[5, 6, 7, 8, 9, 30]), *EXAMPLES[1:]]
    assert collate(changed, PAD).targets.tolist() == collate(EXAMPLES, PAD).targets.tolist()
    model = tiny_llama()
    with torch.no_grad():
        torch.testing.assert_close(batch_loss(model, changed, PAD), reference_loss(model, changed))


def test_training_lowers_the_answer_loss_and_repeats_exactly():
    settings = CausalTrainSettings(epochs=10, batch_size=2, lr=2e-2, warmup_fraction=0.1)
    trained = []
    for _ in range(2):
        model = tiny_llama()
        with torch.no_grad():
            before = reference_loss(model, EXAMPLES).item()
        losses = train_causal_lm(model, EXAMPLES, settings, PAD)
        with torch.no_grad():
            after = reference_loss(model, EXAMPLES).item()
        assert after < 0.5 * before
        assert losses[-1] < losses[0]
        trained.append(model.state_dict())
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_frozen_embeddings_stay_put_and_the_rest_trains():
    model = tiny_llama()
    embeddings = model.get_input_embeddings().weight.detach().clone()
    layer = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    settings = CausalTrainSettings(epochs=1, batch_size=3, lr=1e-2, train_embeddings=False)
    train_causal_lm(model, EXAMPLES, settings, PAD)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, layer)
    assert model.get_input_embeddings().weight.requires_grad  # restored for the caller


def test_a_loss_function_gets_the_answer_logits_with_their_examples_in_order():
    seen = []

    def loss_fn(logits, targets, examples):
        seen.append((logits.shape, targets.tolist(), list(examples)))
        return logits.logsumexp(-1).mean()

    train_causal_lm(
        tiny_llama(), EXAMPLES, CausalTrainSettings(batch_size=3, epochs=1), PAD, loss_fn=loss_fn
    )
    ((shape, targets, examples),) = seen
    assert sorted(examples, key=EXAMPLES.index) == EXAMPLES
    assert shape == (len(targets), VOCAB)
    assert targets == [t for e in examples for t in e.answer_ids]


def test_an_empty_answer_or_no_examples_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        collate([CausalExample(prompt_ids=[1], answer_ids=[])], PAD)
    with pytest.raises(ValueError, match="no examples"):
        train_causal_lm(tiny_llama(), [], CausalTrainSettings(), PAD)
