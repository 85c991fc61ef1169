"""A BERT classifier that mean-pools token states, as sentence-transformers models do.

all-MiniLM-L6-v2 was trained with mean pooling, so a head on the mean of its token states
learns from a few hundred examples where a head on [CLS] does not. The class is registered
with the transformers Auto classes under ``model_type = "bert_meanpool"``, so a saved
student loads like any Hugging Face classifier folder:
``AutoModelForSequenceClassification.from_pretrained(folder)`` after :func:`register`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertPreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput


class BertMeanPoolConfig(BertConfig):
    model_type = "bert_meanpool"


class BertMeanPoolForSequenceClassification(BertPreTrainedModel):
    config_class = BertMeanPoolConfig

    def __init__(self, config: BertMeanPoolConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels or 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> SequenceClassifierOutput:
        states = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        if attention_mask is None:
            pooled = states.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def register() -> None:
    """Make the Auto classes know ``bert_meanpool`` (idempotent)."""
    try:
        AutoConfig.register(BertMeanPoolConfig.model_type, BertMeanPoolConfig)
        AutoModelForSequenceClassification.register(
            BertMeanPoolConfig, BertMeanPoolForSequenceClassification
        )
    except ValueError:
        pass  # already registered in this process
