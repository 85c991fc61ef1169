"""Tiny random causal LMs with a byte-level BPE tokenizer and a chat template, built in
the test and saved like any Hugging Face folder (seconds, offline)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The cat sat on the mat. The dog ate the bone.",
    "Markets rose today as shares in tech firms climbed.",
    "Кошка сидит на ковре. Собака ест кость.",
    "猫坐在垫子上。狗吃骨头。",
    "A headline: ministers agree new budget plan, and the vote passes.",
] * 4


def build_tokenizer(template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE over :data:`CORPUS` (a few hundred tokens): any text encodes, and
    non-Latin characters split across tokens as in real models."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE if template else None,
    )


def build_tiny_lm(
    folder: Path,
    *,
    seed: int,
    layers: int = 2,
    dtype: torch.dtype = torch.float64,
    init: float = 0.2,
    template: bool = True,
) -> Path:
    """A random Llama (hidden 32) saved with its tokenizer into ``folder``. float64 by
    default: padded and incremental decoding then agree far beyond any near-tie.
    ``init`` spreads the weights so that the next-token distributions are peaked."""
    tokenizer = build_tokenizer(template)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=init,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
