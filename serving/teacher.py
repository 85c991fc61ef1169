"""The teacher deployment: the large model, batched across concurrent escalations."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from ray import serve

from serving.classifier import Classifier
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
        self.predict_one.set_max_batch_size(batching.max_batch_size)  # type: ignore[attr-defined]
        self.predict_one.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def info(self) -> dict[str, Any]:
        return {
            "version": self.model.version,
            "labels": self.model.labels,
            "max_tokens": self.model.max_tokens,
        }

    async def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """The escalated inputs of one request in one handle call; each joins the batches
        that form across concurrent requests."""
        return list(await asyncio.gather(*(self.predict_one(t) for t in texts)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict_one(self, texts: list[str]) -> list[dict[str, Any]]:
        """One text in, its probabilities out; Serve gathers concurrent calls into a batch."""
        self.metrics.observe("protege_batch_size", len(texts), model="teacher")
        prediction = await asyncio.to_thread(self.model.predict, texts)
        return [
            {"probs": row.tolist(), "truncated": cut, "version": self.model.version}
            for row, cut in zip(prediction.probs, prediction.truncated, strict=True)
        ]
