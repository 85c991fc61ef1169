"""Teachers that misbehave on every call, for the fault tests (replicas import this module
through PYTHONPATH). Serve restarts a killed teacher, so a dead teacher is simulated by one
that errors or hangs instead."""

import asyncio
import uuid
from pathlib import Path
from typing import Any

from ray import serve

from serving.classify.classifier import Classifier
from serving.config import ModelSpec


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
class FaultyTeacher:
    """mode: "error" raises on every call; "slow" answers after ``delay_s``. With
    ``calls_dir``, each call leaves a file there as it starts (for tests to wait on)."""

    def __init__(
        self, spec: ModelSpec, mode: str, delay_s: float = 0.0, calls_dir: str | None = None
    ) -> None:
        self.model = Classifier(spec.path, device="cpu", max_tokens=spec.max_tokens)
        self.mode, self.delay_s, self.calls_dir = mode, delay_s, calls_dir

    def info(self) -> dict[str, Any]:
        return {
            "version": self.model.version,
            "labels": self.model.labels,
            "max_tokens": self.model.max_tokens,
        }

    async def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        if self.calls_dir is not None:
            (Path(self.calls_dir) / uuid.uuid4().hex).touch()
        if self.mode == "error":
            raise RuntimeError("the teacher's model failed")
        await asyncio.sleep(self.delay_s)
        prediction = self.model.predict(texts)
        return [
            {"probs": row.tolist(), "truncated": cut, "version": self.model.version}
            for row, cut in zip(prediction.probs, prediction.truncated, strict=True)
        ]
