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


def test_two_workers_distil_a_causal_lm_on_the_logged_top_k(serve_cluster, tmp_path):
    """The generative job's loop under Ray Train: token-level distillation on 2 workers,
    the trained weights back in the caller's model."""
    from tiny_lm import build_tiny_lm

    from distill.causal_lm import CausalTrainSettings
    from distill.ray_train import train_causal_with_ray
    from distill.token_kd import TopKExample
    from serving.generate.models import load_language_model

    lm = load_language_model(build_tiny_lm(tmp_path / "student", seed=3), device="cpu")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    examples = [
        TopKExample(
            prompt_ids=[10 + i % 7, 20 + i % 5, 30],
            answer_ids=[40 + i % 3, 50, 2],
            top_ids=[[40 + i % 3, 41, 42], [50, 51, 52]],
            top_logprobs=[[-0.1, -2.5, -3.0], [-0.2, -2.0, -4.0]],
        )
        for i in range(32)
    ]
    settings = CausalTrainSettings(epochs=2, batch_size=8, lr=1e-2, train_embeddings=True)
    losses, nodes = train_causal_with_ray(
        lm.model, lm.tokenizer, examples, settings, ("token", 0.5, 1.0), 2, str(tmp_path / "runs")
    )
    assert len(losses) == 2 and losses[1] < losses[0]
    assert len(nodes) == 1
    changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("layers.0" in k for k in changed)
