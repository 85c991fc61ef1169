"""The same training loop under Ray Train's ``TorchTrainer`` with N workers.

Each worker loads the starting weights from a folder, trains on its share of every
epoch, and gradients are averaged across workers; rank 0 saves the result, which is
loaded back into the caller's model. One worker never comes here: it is a plain process.
On a cluster ``RAY_ADDRESS`` names it; locally Ray starts on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.finetune import TrainSettings, fine_tune


def _worker(config: dict[str, Any]) -> None:
    import ray.train
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from serving import meanpool

    meanpool.register()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = AutoModelForSequenceClassification.from_pretrained(
        config["start"], use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(config["start"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    losses = fine_tune(
        model,
        tokenizer,
        config["texts"],
        config["labels"],
        TrainSettings(**config["settings"]),
        device,
        desc="distil (ray train)",
        soft_targets=config["soft"],
        rank=rank,
        world_size=world,
    )
    if rank == 0:  # the weights are the same on every rank: one writes them
        model.save_pretrained(config["out"])
        (Path(config["out"]) / "epoch_losses.json").write_text(json.dumps(losses))


def _connect() -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    from serving.local_ray import LOOPBACK, pin_loopback  # Ray core settings, not Serve

    pin_loopback()
    ray.init(
        address="local", _node_ip_address=LOOPBACK, include_dashboard=False, log_to_driver=False
    )


def train_with_ray(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    labels: list[int],
    soft: list[list[float]],
    settings: TrainSettings,
    workers: int,
) -> list[float]:
    """Train ``model`` in place with ``workers`` Ray Train workers; returns rank 0's losses."""
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            f"--workers > 1 needs Ray Train: pip install 'ray[train]' ({exc})"
        ) from None
    _connect()
    with tempfile.TemporaryDirectory(prefix="protege-train-") as scratch:
        start, out = Path(scratch) / "start", Path(scratch) / "out"
        model.save_pretrained(start)
        tokenizer.save_pretrained(start)
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "start": str(start),
                "out": str(out),
                "texts": texts,
                "labels": labels,
                "soft": soft,
                "settings": asdict(settings),
            },
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=torch.cuda.is_available()),
            run_config=RunConfig(storage_path=str(Path(scratch) / "runs"), name="distill"),
        )
        trainer.fit()
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        return list(json.loads((out / "epoch_losses.json").read_text()))
