"""The same training loops (classification, and a causal LM's) under Ray Train's
``TorchTrainer`` with N workers, which may run on other nodes.

- The starting weights (the whole model folder: weights, config, tokenizer) travel as one
  object in Ray's object store; each worker writes them to its own local scratch folder.
- Each worker trains on its share of every epoch; DistributedDataParallel averages the
  gradients (``distill.finetune``).
- Rank 0 reports the result as a ``ray.train.Checkpoint`` under ``storage_path``, a folder
  or URI every node reaches (the shared volume on a cluster, never one node's temp folder);
  the caller loads it back from there. One worker never comes here: it is a plain process.
On a cluster ``RAY_ADDRESS`` names it; locally Ray starts on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.causal_lm import CausalExample, CausalTrainSettings
from distill.finetune import TrainSettings, fine_tune


def _worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from serving.classify import meanpool

    meanpool.register()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    with tempfile.TemporaryDirectory(prefix="protege-start-") as scratch:
        start = _unpack(ray.get(config["start"]), Path(scratch))  # from the object store
        model = AutoModelForSequenceClassification.from_pretrained(start, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(start)
    device = ray.train.torch.get_device()  # this worker's own GPU, or the CPU
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
    _report(model, losses, rank, world)


def _pack(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _unpack(files: dict[str, bytes], folder: Path) -> Path:
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


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
    storage_path: str | None = None,
    s3_endpoint: str | None = None,
    placement_strategy: str = "PACK",
) -> tuple[list[float], list[str]]:
    """Train ``model`` in place with ``workers`` Ray Train workers; returns rank 0's losses
    and the Ray nodes the workers ran on.
    ``storage_path``: where the checkpoint goes (every node must reach it; default a local
    temporary folder, enough for a single machine; ``s3://bucket/prefix`` through pyarrow's
    S3 file system at ``s3_endpoint`` or $AWS_ENDPOINT_URL)."""
    loop = {"texts": texts, "labels": labels, "soft": soft, "settings": asdict(settings)}
    return _fit(
        _worker, loop, model, tokenizer, workers, storage_path, s3_endpoint, placement_strategy
    )


def train_causal_with_ray(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[CausalExample],
    settings: CausalTrainSettings,
    loss: tuple[str, float, float],
    workers: int,
    storage_path: str | None = None,
    s3_endpoint: str | None = None,
    placement_strategy: str = "PACK",
) -> tuple[list[float], list[str]]:
    """:func:`train_with_ray` for a causal LM on (prompt, answer) pairs
    (:func:`distill.causal_lm.train_causal_lm`); ``loss`` is ``("token", alpha,
    temperature)`` for token-level distillation, else ``("sequence", 0, 0)``."""
    loop = {"examples": list(examples), "settings": asdict(settings), "loss": loss}
    return _fit(
        _causal_worker,
        loop,
        model,
        tokenizer,
        workers,
        storage_path,
        s3_endpoint,
        placement_strategy,
    )


def _causal_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForCausalLM

    from distill.causal_lm import answer_cross_entropy, train_causal_lm
    from distill.token_kd import token_distillation_loss
    from serving.generate.models import load_tokenizer

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    with tempfile.TemporaryDirectory(prefix="protege-start-") as scratch:
        start = _unpack(ray.get(config["start"]), Path(scratch))
        model = AutoModelForCausalLM.from_pretrained(start, use_safetensors=True)
        tokenizer = load_tokenizer(start)  # padding as the in-process loop pads
    model.to(ray.train.torch.get_device())  # type: ignore[arg-type]
    kind, alpha, temperature = config["loss"]
    loss_fn = token_distillation_loss(alpha, temperature) if kind == "token" else None
    losses = train_causal_lm(
        model,
        config["examples"],
        CausalTrainSettings(**config["settings"]),
        int(tokenizer.pad_token_id),
        loss_fn=loss_fn or answer_cross_entropy,
        desc="distil (ray train)",
        rank=rank,
        world_size=world,
    )
    _report(model, losses, rank, world)


def _report(model: PreTrainedModel, losses: list[float], rank: int, world: int) -> None:
    """Every rank reports its losses and node; rank 0 also the weights, as a checkpoint."""
    import ray
    import ray.train

    nodes: list[str | None] = [None] * world  # which node each rank ran on, for the report
    torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    metrics = {
        "epoch_losses": json.dumps(losses),
        "nodes": json.dumps(sorted(set(map(str, nodes)))),
    }
    if rank != 0:  # the weights are the same on every rank: one reports them
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="protege-out-") as out:
        model.save_pretrained(out)  # safetensors
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(out))


def _fit(
    worker: Any,
    loop: dict[str, Any],
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    workers: int,
    storage_path: str | None,
    s3_endpoint: str | None,
    placement_strategy: str,
) -> tuple[list[float], list[str]]:
    """Run ``worker`` on ``workers`` Ray Train workers from ``model``'s weights (shipped
    through the object store) and load rank 0's checkpoint back into ``model``."""
    try:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            f"--workers > 1 needs Ray Train: pip install 'ray[train]' ({exc})"
        ) from None
    _connect()
    with tempfile.TemporaryDirectory(prefix="protege-train-") as scratch:
        path, filesystem = _storage(storage_path or str(Path(scratch) / "runs"), s3_endpoint)
        start = Path(scratch) / "start"
        model.save_pretrained(start)
        tokenizer.save_pretrained(start)
        trainer = TorchTrainer(
            worker,
            train_loop_config={"start": ray.put(_pack(start)), **loop},
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=torch.cuda.is_available(),
                placement_strategy=placement_strategy,
            ),
            run_config=RunConfig(
                storage_path=path,
                storage_filesystem=filesystem,
                name=f"distill-{uuid.uuid4().hex[:8]}",
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train returned no checkpoint: {result.error!r}")
        with result.checkpoint.as_directory() as folder:
            # through from_pretrained: it re-ties the weights a tied checkpoint leaves out
            trained = type(model).from_pretrained(folder, use_safetensors=True)
            model.load_state_dict(trained.state_dict())
        metrics = result.metrics or {}
        losses = list(json.loads(metrics["epoch_losses"]))
        _remove_run(result.path, filesystem)
        return losses, list(json.loads(metrics.get("nodes", "[]")))


def _storage(uri: str, s3_endpoint: str | None) -> tuple[str, Any]:
    """Ray Train's storage path and file system for a folder or an s3:// URI (through the
    same fsspec S3 file system as the registry: it writes a small file as one object)."""
    if not uri.startswith("s3://"):
        return uri, None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from serving.contracts.storage import ObjectStore

    store = ObjectStore(uri, s3_endpoint)
    return uri.removeprefix("s3://"), PyFileSystem(FSSpecHandler(store.fs))


def _remove_run(path: str, filesystem: Any) -> None:
    """The run's folder under the storage path, once its checkpoint is loaded (each run
    would otherwise leave a whole model there)."""
    if filesystem is not None:
        with contextlib.suppress(OSError):
            filesystem.delete_dir(path)
    elif "://" not in path:
        shutil.rmtree(path, ignore_errors=True)
