"""Fine-tuning a sequence classifier: a plain PyTorch loop, read top to bottom.

With hard labels only it is ordinary supervised training (building the default models);
given the teacher's probabilities as soft targets it distils, with
:func:`distill.losses.distillation_loss`.

The head gets its own, larger learning rate: with one rate of 3e-5 a fresh head stays
nearly uniform after a few epochs (useless soft targets); 1e-3 for the head trains it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from distill.losses import distillation_loss
from serving.contracts import defaults


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 3
    batch_size: int = 16
    lr_encoder: float = 3e-5
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_tokens: int = defaults.MAX_TOKENS
    seed: int = 0
    temperature: float = defaults.TEMPERATURE  # distillation only
    alpha: float = defaults.ALPHA  # weight of the soft term; distillation only


def _param_groups(model: PreTrainedModel, settings: TrainSettings) -> list[dict[str, object]]:
    prefix = model.base_model_prefix + "."
    encoder = [p for n, p in model.named_parameters() if n.startswith(prefix)]
    head = [p for n, p in model.named_parameters() if not n.startswith(prefix)]
    if not head:
        raise ValueError(f"{type(model).__name__} has no parameters outside {prefix!r}: no head?")
    return [
        {"params": encoder, "lr": settings.lr_encoder},
        {"params": head, "lr": settings.lr_head},
    ]


def fine_tune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    labels: list[int],
    settings: TrainSettings,
    device: torch.device,
    desc: str = "fine-tune",
    soft_targets: list[list[float]] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[float]:
    """Train in place on (text, label index[, teacher probabilities]) examples; returns the
    mean loss of each epoch. With ``world_size`` > 1 (under Ray Train) each rank trains on
    its equal share of every epoch's shuffle, and DistributedDataParallel averages the
    gradients across ranks (bucketed, overlapping the backward pass)."""
    if len(texts) != len(labels) or not texts:
        raise ValueError(
            f"need equal, non-empty texts and labels; got {len(texts)} and {len(labels)}"
        )
    torch.manual_seed(settings.seed)
    order_rng = random.Random(settings.seed)  # the same shuffle on every rank
    model.to(device)  # type: ignore[arg-type]
    model.train()
    net: nn.Module = model
    if world_size > 1:  # the process group is set up by Ray Train
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(
        _param_groups(model, settings), weight_decay=settings.weight_decay
    )
    share = len(texts) // world_size  # equal shares: every rank takes the same number of steps
    total = -(-share // settings.batch_size) * settings.epochs
    warmup = max(1, int(total * settings.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))),
    )
    losses = []
    with tqdm(total=total, desc=desc, unit="step", disable=rank != 0) as bar:
        for epoch in range(settings.epochs):
            order = list(range(len(texts)))
            order_rng.shuffle(order)
            mine = order[rank * share : (rank + 1) * share]
            epoch_loss = 0.0
            for start in range(0, len(mine), settings.batch_size):
                batch = mine[start : start + settings.batch_size]
                loss = _batch_loss(
                    net,
                    model.config,
                    tokenizer,
                    texts,
                    labels,
                    soft_targets,
                    batch,
                    settings,
                    device,
                )
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                epoch_loss += loss.item() * len(batch)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            losses.append(epoch_loss / len(mine))
    model.eval()
    return losses


def _batch_loss(
    net: nn.Module,
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    labels: list[int],
    soft_targets: list[list[float]] | None,
    batch: list[int],
    settings: TrainSettings,
    device: torch.device,
) -> torch.Tensor:
    window = min(tokenizer.model_max_length, config.max_position_embeddings)
    encoded = tokenizer(
        [texts[i] for i in batch],
        padding=True,
        truncation=True,
        max_length=min(settings.max_tokens, window),
        return_tensors="pt",
    ).to(device)
    target = torch.tensor([labels[i] for i in batch], device=device)
    logits = net(**encoded).logits
    if soft_targets is None:
        return nn.functional.cross_entropy(logits, target)
    teacher = torch.tensor([soft_targets[i] for i in batch], device=device)
    return distillation_loss(
        logits, teacher, target, temperature=settings.temperature, alpha=settings.alpha
    )
