"""The teacher deployment: the large model, batched across concurrent escalations."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from ray import serve

from serving.batcher import Batcher
from serving.classify.classifier import Classifier
from serving.config import BatchingConfig, ModelSpec
from serving.metrics import Metrics


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=256,
    max_queued_requests=512,  # a full teacher fails the call at once: the student answers
)
class Teacher:
    def __init__(
        self,
        spec: ModelSpec,
        batching: BatchingConfig,
        device: str = "auto",
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.model = Classifier(spec.path, device=device, max_tokens=spec.max_tokens)
        self.model.warm_up()
        self.metrics = Metrics()
        self.batcher: Batcher[str, dict[str, Any]] = Batcher(
            self._predict_batch, batching.max_batch_size, batching.batch_wait_timeout_s
        )

    def info(self) -> dict[str, Any]:
        return {
            "version": self.model.version,
            "labels": self.model.labels,
            "max_tokens": self.model.max_tokens,
        }

    async def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """The escalated inputs of one request, in one handle call; they join the batch
        that forms across concurrent requests when the model is free."""
        return await self.batcher.submit(texts)

    async def _predict_batch(self, texts: list[str]) -> list[dict[str, Any]]:
        self.metrics.observe("protege_batch_size", len(texts), model="teacher")
        prediction = await asyncio.to_thread(self.model.predict, texts)
        return [
            {"probs": row.tolist(), "truncated": cut, "version": self.model.version}
            for row, cut in zip(prediction.probs, prediction.truncated, strict=True)
        ]
