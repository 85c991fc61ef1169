"""Load a causal language model from a folder and render prompts into token ids.

The model never imports the transport: this module knows nothing of HTTP or Ray. The same
code path loads the default pair, the tiny test models and a user's own folder. Weights
load as safetensors only; the tokenizer comes from the same folder and pads on the left,
as batched generation needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

Message = Mapping[str, str]
"""A chat message: ``{"role": ..., "content": ...}``."""


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available here")
    return torch.device(requested)


def _ids(value: int | Iterable[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


@dataclass
class LanguageModel:
    """A loaded causal LM, its tokenizer and the device it runs on.

    ``eos_token_ids`` end a row of generation: the model's generation config's and the
    tokenizer's end-of-sequence ids together (an instruct model often ends a turn with a
    token, such as ``<|im_end|>``, that only one of them names).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    folder: Path | None = None

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def load_tokenizer(folder: Path | str) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, padding on the left, with a pad token (its EOS if none)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{folder}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_language_model(
    folder: Path | str, device: str = "auto", dtype: torch.dtype | None = None
) -> LanguageModel:
    """Load ``folder`` (``config.json``, ``*.safetensors``, the tokenizer) in eval mode.

    ``dtype`` None keeps the dtype the weights were saved in.
    """
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    target = pick_device(device)
    tokenizer = load_tokenizer(folder)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        folder, use_safetensors=True, dtype=dtype if dtype is not None else "auto"
    )
    cast(Any, model).to(target)  # transformers wraps `to` in a way mypy cannot call
    model.eval()
    eos = _ids(getattr(model.generation_config, "eos_token_id", None))
    eos |= _ids(model.config.eos_token_id) | _ids(tokenizer.eos_token_id)
    if not eos:
        raise ValueError(f"{folder}: neither the model nor the tokenizer names an EOS token")
    return LanguageModel(model, tokenizer, target, frozenset(eos), folder)


def check_language_model(folder: Path, where: str) -> int | None:
    """A causal-LM folder protege can serve: ``config.json``, safetensors weights, a
    tokenizer that loads, with a chat template. Returns the model's window (its position
    embeddings; None when unknown); raises ValueError starting with ``where``."""
    if not (folder / "config.json").exists():
        raise ValueError(
            f"{where} is not a model folder (no config.json); build the default pair "
            "with `protege models build-generate` or point it at a Hugging Face "
            "causal-LM folder"
        )
    if not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"{where} holds no *.safetensors weights: protege loads only safetensors; "
            "save the model with `save_pretrained(folder)` (safetensors by default)"
        )
    try:
        tokenizer = load_tokenizer(folder)
    except Exception as exc:
        raise ValueError(f"{where}: its tokenizer cannot be loaded: {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{where}: its tokenizer has no chat template, so /v1/chat/completions "
            "cannot render a chat; serve an instruct model, or add a chat_template to "
            "its tokenizer (tokenizer.chat_template = ...; save_pretrained)"
        )
    window = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
    return int(window) if window else None


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """The token ids of ``messages`` through the chat template, ending with the prompt of
    the assistant's turn (``add_generation_prompt``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template: send a completion (a plain prompt) instead, "
            "or serve a model whose tokenizer_config.json holds a chat_template"
        )
    if not messages:
        raise ValueError("a chat needs at least one message")
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
    )
    # the template writes its own special tokens (BOS included, where it has one)
    ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def render_completion(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The token ids of a plain prompt, with the tokenizer's own special tokens (a BOS
    where the tokenizer adds one)."""
    ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
    if not ids:
        raise ValueError("the prompt is empty: a completion needs at least one token")
    return ids


_SPACE = re.compile(r"\s+")


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether a draft written with ``a``'s ids means the same text to ``b``, with the same
    chat template: same vocabulary (added tokens included), same special tokens."""
    return a is b or not tokenizer_differences(a, b)


def tokenizer_differences(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> list[str]:
    """What differs between two tokenizers, in words (empty: they are the same)."""
    differences = []
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    if vocab_a != vocab_b:
        differences.append(f"vocabulary ({len(vocab_a)} against {len(vocab_b)} tokens)")
    if a.all_special_tokens != b.all_special_tokens or a.all_special_ids != b.all_special_ids:
        differences.append("special tokens")
    if getattr(a, "chat_template", None) != getattr(b, "chat_template", None):
        differences.append("chat template")
    return differences
