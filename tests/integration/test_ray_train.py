"""The distillation loop under Ray Train with 2 CPU workers, on a tiny model."""

import pytest
import torch
from tiny_models import build_tiny
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill.finetune import TrainSettings
from distill.ray_train import train_with_ray
from serving.classify import meanpool

pytestmark = pytest.mark.integration


def test_two_workers_train_the_model_in_place(serve_cluster, tmp_path):
    folder = build_tiny(tmp_path / "student", seed=3, mean_pool=True)
    meanpool.register()
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    texts = [f"headline number {i} about {'markets' if i % 2 else 'football'}" for i in range(64)]
    labels = [i % 2 * 3 for i in range(64)]  # business or sport
    soft = [
        [0.9, 0.025, 0.025, 0.025, 0.025] if i % 2 else [0.025] * 3 + [0.9, 0.025]
        for i in range(64)
    ]
    settings = TrainSettings(epochs=2, batch_size=8, max_tokens=16, lr_encoder=1e-3, lr_head=1e-2)
    storage = tmp_path / "shared-storage"  # where every node would reach the checkpoint
    losses, nodes = train_with_ray(model, tokenizer, texts, labels, soft, settings, 2, str(storage))
    assert len(losses) == 2 and losses[1] < losses[0]
    assert len(nodes) == 1  # both workers on this session's one Ray node
    assert storage.is_dir()  # the run kept its checkpoint there ...
    assert list(storage.glob("distill-*/checkpoint_*")) == []  # ... until it was loaded
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "classifier.weight" in changed and any(k.startswith("bert.encoder") for k in changed)
