"""The generative teacher as its own Ray Serve deployment, streaming through the handle.

The deployment wraps :class:`~serving.generate.teacher_engine.TeacherEngine` (batched,
draft-verifying, free of Ray); :class:`HandleTeacher` is the gateway replica's
:class:`~serving.generate.teacher_engine.TeacherClient` over the deployment's handle:
``handle.options(stream=True).generate.remote(request)`` yields the engine's items one by
one, and closing the client's generator cancels the call (the engine then stops the
answer's batch once nobody listens to any of its rows).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from pathlib import Path

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serving.config_sections import BatchingConfig
from serving.contracts.manifest import read_manifest, weights_digest
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_completion
from serving.generate.teacher_engine import (
    TeacherEngine,
    TeacherInfo,
    TeacherItem,
    TeacherRequest,
)

INFO_TIMEOUT_S = 10.0  # a control call, not the answer's teacher_timeout_s


def model_version(folder: Path) -> str:
    """A folder's version: its manifest's, else the digest of its weights."""
    manifest = read_manifest(folder)
    return manifest.version if manifest else weights_digest(folder)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
    max_queued_requests=128,  # a full teacher fails the call at once: the student answers
)
class GenerativeTeacher:
    def __init__(
        self,
        path: str | Path,
        batching: BatchingConfig | None = None,
        device: str = "auto",
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        batching = batching or BatchingConfig(max_batch_size=8, batch_wait_timeout_s=0.01)
        lm = load_language_model(path, device=device)
        self.engine = TeacherEngine(
            lm, model_version(Path(path)), batching.max_batch_size, batching.batch_wait_timeout_s
        )
        self._warm_up()

    def _warm_up(self) -> None:
        """One short generation, so the first escalation does not pay for lazy set-up."""
        lm = self.engine.lm
        generate_batch(lm, [render_completion(lm.tokenizer, "warm-up")], SamplingSettings(2))

    def info(self) -> TeacherInfo:
        return self.engine.info()

    async def generate(self, request: TeacherRequest) -> AsyncGenerator[TeacherItem, None]:
        """The answer's items, streamed (call with ``handle.options(stream=True)``)."""
        async for item in self.engine.stream(request):
            yield item


class HandleTeacher:
    """:class:`~serving.generate.teacher_engine.TeacherClient` over the deployment."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def info(self) -> TeacherInfo:
        call = self.handle.info.remote()
        try:
            info: TeacherInfo = await asyncio.wait_for(call, INFO_TIMEOUT_S)
        except BaseException:
            call.cancel()
            raise
        return info

    async def stream(self, request: TeacherRequest) -> AsyncGenerator[TeacherItem, None]:
        response = self.handle.options(stream=True).generate.remote(request)
        assert isinstance(response, DeploymentResponseGenerator)
        try:
            async for item in response:
                yield item
        finally:
            response.cancel()  # a no-op once the stream has ended
