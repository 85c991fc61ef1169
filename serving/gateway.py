"""The ingress deployment: one Serve application hosts the cascades its config names.

A classification cascade (``serving.classify.host``) and a generative one
(``serving.generate.host``) live side by side in each replica, each with its own student,
teacher handle, slot, registry follower, log and teacher probe. This class is the one
ingress over them: the routes (``serving.http_api``, and ``serving.generate.openai_api``
when a generative cascade is hosted, all behind ``serving.guard``), readiness over every
teacher, ``/v1/models`` listing every cascade, ``user_config`` pins, and the background
threads that follow the registries and re-publish the serving gauges.
"""

import logging
import threading
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.access import gatekeeper
from serving.classify.host import ClassifyHost
from serving.classify.service import Answer, Routing
from serving.config import GatewayConfig, SwapRequest
from serving.errors import NotHosted
from serving.follow import Following
from serving.generate.host import GenerateHost
from serving.generate.openai_api import add_openai_routes
from serving.generate.service import GenerationService
from serving.hot_swap import without_paths
from serving.http_api import Readiness, build_api
from serving.metrics import ReplicaMetrics
from serving.schemas import ModelList

logger = logging.getLogger("ray.serve")
SERVING_GAUGES_EVERY_S = 5.0


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=128,
    # beyond this many waiting requests per replica, Serve answers 503 with Retry-After
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
)
@serve.ingress()
class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        teacher: DeploymentHandle | None,
        generative_teacher: DeploymentHandle | None = None,
    ) -> None:
        """``teacher`` is the classification cascade's teacher deployment (None when the
        config hosts none), ``generative_teacher`` the generative cascade's (None for a remote
        teacher)."""
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.metrics = ReplicaMetrics()
        started = int(time.time())  # an entry's `created` without a manifest
        replica = serve.get_replica_context().replica_tag
        self.classify_host: ClassifyHost | None = None
        if config.classify:
            if teacher is None:
                raise ValueError("the classification cascade needs its teacher deployment")
            self.classify_host = ClassifyHost(config, teacher, self.metrics, replica, started)
        self.generate_host: GenerateHost | None = None
        if config.generate is not None:
            self.generate_host = GenerateHost(
                config.generate,
                generative_teacher,
                self.metrics,
                replica=replica,
                started=started,
                device=config.device,
                s3_endpoint=config.s3_endpoint,
                unready_after_s=config.teacher_unready_after_s,
            )
        self.gatekeeper = gatekeeper(config.access)
        logger.warning("%s", self.gatekeeper.describe())
        # Ray exports a gauge only while it is being set: re-publish what serves, so the
        # versions, threshold and eval figures stay visible between swaps
        self._stopped = threading.Event()
        if self.classify_host is not None:
            threading.Thread(target=self._republish, daemon=True, name="serving-gauges").start()
        if any(f.follower is not None for f in self._followings()):
            threading.Thread(target=self._follow, daemon=True, name="registry-follower").start()

    def _hosts(self) -> list[ClassifyHost | GenerateHost]:
        return [h for h in (self.classify_host, self.generate_host) if h is not None]

    def _followings(self) -> list[Following]:
        return [host.following for host in self._hosts()]

    def _republish(self) -> None:
        while not self._stopped.wait(SERVING_GAUGES_EVERY_S):
            if self.classify_host is not None:
                self.classify_host.publish_serving()

    def _follow(self) -> None:
        """Read every registry's pointer each ``registry_poll_s``; a failure is logged and
        the following goes on."""
        while not self._stopped.wait(self.config.registry_poll_s):
            for following in self._followings():
                try:
                    following.poll()
                except Exception as exc:
                    logger.warning(
                        "registry poll failed, trying again: %s", without_paths(str(exc))
                    )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update: per cascade, ``student_version`` pins that version
        (loaded in the background), none follows the registry's pointer again;
        ``threshold`` overrides the version's calibrated one (applied in place when the
        version stays). The top-level fields are the classification cascade's, those under
        ``generate`` the generative one's. A bad update never takes the replica down."""
        try:
            swap = SwapRequest.model_validate(user_config)
        except ValidationError as exc:
            self._refused(self._followings(), exc.errors()[0]["msg"])
            return
        pins = []
        if self.classify_host is not None:
            pins.append((self.classify_host.following, swap.student_version, swap.threshold))
        elif swap.student_version is not None or swap.threshold is not None:
            reason = "this gateway hosts no classification cascade: put the pin under generate"
            self._refused(self._followings(), reason)
            return
        pin = swap.generate
        if self.generate_host is not None:
            pins.append((self.generate_host.following, pin.student_version, pin.threshold))
        elif pin.student_version is not None or pin.threshold is not None:
            reason = "this gateway hosts no generative cascade: leave `generate` out"
            self._refused(self._followings(), reason)
            return
        for following, version, threshold in pins:
            try:
                following.configure(version, threshold)
            except Exception as exc:
                self._refused([following], str(exc))

    def _refused(self, followings: list[Following], reason: str) -> None:
        for following in followings:
            following.refused(reason)
        self.metrics.inc("protege_hot_swaps", result="failure")
        logger.error("hot swap refused: %s", reason)

    # --- what the routes call (serving.http_api, serving.generate.openai_api) -------------

    def __serve_build_asgi_app__(self) -> FastAPI:
        routes = []
        if self.generate_host is not None:

            def openai_routes(api: FastAPI, auth: list[Any]) -> None:
                add_openai_routes(api, self, self.config.limits, self.gatekeeper, auth)

            routes.append(openai_routes)
        return build_api(self, self.config.limits, self.gatekeeper, self.metrics.rejected, routes)

    async def classify(self, texts: list[str], request_id: str, routing: Routing) -> Answer:
        if self.classify_host is None:  # the route checks first: never reached
            raise NotHosted(None, "classify", self.hosted())
        return await self.classify_host.classify(texts, request_id, routing)

    def generator(self, name: str) -> GenerationService:
        if self.generate_host is None or name != self.generate_host.name:
            raise NotHosted(name, "generate", self.hosted())
        return self.generate_host.service

    def request_id(self, given: str | None) -> str:
        # Serve's proxy adopts a client's x-request-id and echoes it in the response
        return given or serve.context._get_serve_request_context().request_id or uuid.uuid4().hex

    async def readiness(self) -> Readiness:
        """Ready when every hosted cascade's teacher is up and has not been failing for
        longer than ``teacher_unready_after_s`` (each probed on a timer, never per caller).
        The versions shown are the first cascade's (the classification one when hosted)."""
        states = [(host.name, await host.readiness()) for host in self._hosts()]
        for name, state in states:
            if state.status != "ready":
                reason = f"{name}: {state.reason}" if len(states) > 1 else state.reason
                return Readiness(status="not ready", reason=reason)
        return states[0][1]

    def hosted(self) -> dict[str, str]:
        return self.config.hosted()

    async def models(self) -> ModelList:
        return ModelList(data=[await host.entry() for host in self._hosts()])

    def __del__(self) -> None:
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
        for name in ("classify_host", "generate_host"):
            host = getattr(self, name, None)
            if host is not None:
                host.close()
