"""The ingress deployment: a replica holds the student, the cascade and its log.

The student runs inside the ingress replica so that a request the student keeps costs one
proxy hop and no handle call (each hop costs milliseconds of CPU on a small machine);
concurrent requests are batched by ``serving.batcher`` (a batch forms when the model is
free). Only escalated inputs cross to the teacher deployment, one handle call a request. The routes are in ``serving.http_api`` (behind
``serving.guard``), the cascade's orchestration in ``serving.classify.service``; this class wires
them to Ray: the batched student, the teacher handle, hot swaps and the serving gauges.
"""

import asyncio
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.access import gatekeeper
from serving.batcher import Batcher
from serving.classify.service import Answer, CascadeService, Routing, StudentRow
from serving.config import GatewayConfig, SwapRequest
from serving.contracts.registry import Registry
from serving.follow import PointerFollower
from serving.hot_swap import ActiveStudent, Loader, StudentSlot, import_loader, without_paths
from serving.http_api import Readiness, build_api
from serving.log_sink import LogSink
from serving.metrics import GatewayMetrics
from serving.schemas import ClassifyCascadeInfo, ModelEntry, ModelInfo, ModelList, SwapStatus
from serving.teacher_probe import TeacherProbe

logger = logging.getLogger("ray.serve")
SERVING_GAUGES_EVERY_S = 5.0
FIRST_LOAD_WAIT_S = 300.0  # Serve holds a new replica's first requests while reconfigure runs
TEACHER_INFO_TIMEOUT_S = 10.0  # the teacher's info (a control call, not teacher_timeout_s)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=128,
    # beyond this many waiting requests per replica, Serve answers 503 with Retry-After
    max_queued_requests=256,
    backpressure_config={"status_code": 503, "retry_after_s": 1},
)
@serve.ingress()
class Gateway:
    def __init__(self, config: GatewayConfig, teacher: DeploymentHandle) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.teacher = teacher
        self.started = int(time.time())  # a /v1/models entry's `created` without a manifest
        self.metrics = GatewayMetrics()
        self.registry = self._open_registry()
        loader = import_loader(config.student_loader)
        initial = self._load_initial(loader)
        self._configured = False
        self.slot = StudentSlot(
            initial,
            config.cascade,
            config.device,
            config.student.max_tokens,
            loader,
            on_result=self._swapped,
        )
        self.follower = (
            PointerFollower(self.registry.current, self.registry.path, self.slot)
            if self.registry
            else None
        )
        self.labels = initial.model.labels
        self.student_batcher: Batcher[str, StudentRow] = Batcher(
            self._student_batch,
            config.batching.max_batch_size,
            config.batching.batch_wait_timeout_s,
        )
        replica = serve.get_replica_context().replica_tag
        # an unusable log folder is counted and retried, never fatal
        self.log = LogSink(config.log, replica, self.metrics, config.s3_endpoint)
        self.service = CascadeService(
            config,
            self.labels,
            self.student_batcher.submit,
            self._ask_teacher,
            self.log,
            self.metrics,
        )
        self.gatekeeper = gatekeeper(config.access)
        logger.warning("%s", self.gatekeeper.describe())
        self._teacher_info: dict[str, Any] | None = None
        self.teacher_probe = TeacherProbe(
            self.service, self._teacher_details, config.teacher_unready_after_s
        )
        self._serving: tuple[str, str] | None = None
        self._publish_serving()
        # Ray exports a gauge only while it is being set: re-publish what serves, so the
        # versions, threshold and eval figures stay visible between swaps
        self._stopped = threading.Event()
        threading.Thread(target=self._republish, daemon=True, name="serving-gauges").start()
        if self.follower is not None:
            threading.Thread(target=self._follow, daemon=True, name="registry-follower").start()
        logger.info("student %s ready (%s)", initial.version, initial.rule.description)

    def _open_registry(self) -> Registry | None:
        """The registry, checked reachable (else the replica stops with an error naming it)."""
        if not self.config.registry:
            return None
        registry = Registry(
            self.config.registry,
            cache_dir=self.config.registry_cache_dir,
            endpoint_url=self.config.s3_endpoint,
            on_refused=lambda version: self.metrics.inc("protege_versions_refused"),
        )
        registry.store.check()
        return registry

    def _republish(self) -> None:
        while not self._stopped.wait(SERVING_GAUGES_EVERY_S):
            self._publish_serving()

    def _follow(self) -> None:
        """Read the registry's pointer every ``registry_poll_s``; a failure is logged and the
        following goes on."""
        assert self.follower is not None
        while not self._stopped.wait(self.config.registry_poll_s):
            try:
                self.follower.poll()
            except Exception as exc:
                logger.warning("registry poll failed, trying again: %s", without_paths(str(exc)))

    def _swapped(self, result: str, seconds: float) -> None:
        self.metrics.inc("protege_hot_swaps", result=result)
        self.metrics.observe("protege_hot_swap_duration_seconds", seconds)
        self._publish_serving()

    def _publish_serving(self) -> None:
        student = self.slot.active
        teacher = self._teacher_info["version"] if self._teacher_info else "unknown"
        manifest = student.model.manifest
        figures = {k: v for k, v in (manifest.eval if manifest else {}).items() if 0 <= v <= 1}
        self.metrics.serving(student.version, teacher, student.rule.value, figures, self._serving)
        self._serving = (student.version, teacher)

    def _load_initial(self, loader: Loader) -> ActiveStudent:
        """The registry's current version; ``student.path`` when there is none, or when it
        cannot be loaded (a replica must come up: the follower keeps trying the pointer)."""
        config = self.config

        def load(folder: Path) -> ActiveStudent:
            return loader(folder, config.cascade, config.device, config.student.max_tokens, None)

        current = self.registry.current() if self.registry else None
        if self.registry is not None and current:
            try:
                return load(self.registry.path(current))
            except Exception as exc:
                logger.error(
                    "current version %s cannot be loaded, serving student.path: %s",
                    current,
                    without_paths(str(exc)),
                )
        return load(config.student.path)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update: ``student_version`` pins that version (loaded in the
        background), none follows the registry's pointer again; ``threshold`` overrides
        the version's calibrated one (applied in place when the version stays)."""
        try:
            swap = SwapRequest.model_validate(user_config)
            if self.follower is not None:
                self.follower.configure(swap.student_version, swap.threshold)
                if not self._configured:  # a new replica serves the pinned version at once
                    self.slot.wait(FIRST_LOAD_WAIT_S)
            elif swap.student_version is not None:
                raise ValueError("student_version in user_config needs `registry` in the config")
            else:
                active = self.slot.active
                self.slot.request(active.version, active.model.folder, swap.threshold)
            self._configured = True
        except Exception as exc:  # a bad update never takes the replica down
            self.slot.stats.failures += 1
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            self.slot.stats.last_error = without_paths(f"user_config refused: {reason}")
            self.metrics.inc("protege_hot_swaps", result="failure")
            logger.error("hot swap refused: %s", exc)

    # --- what the routes call (serving.http_api) -------------------------------------------

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self, self.config.limits, self.gatekeeper, self.metrics.rejected)

    async def classify(self, texts: list[str], request_id: str, routing: Routing) -> Answer:
        return await self.service.classify(texts, request_id, routing)

    def request_id(self, given: str | None) -> str:
        # Serve's proxy adopts a client's x-request-id and echoes it in the response
        return given or serve.context._get_serve_request_context().request_id or uuid.uuid4().hex

    async def readiness(self) -> Readiness:
        """Ready when the teacher is up and has not been failing for longer than
        ``teacher_unready_after_s``; the teacher is probed on a timer, never per caller."""
        return await self.teacher_probe.readiness(self.slot.active.version)

    def hosted(self) -> dict[str, str]:
        return {self.config.cascade.name: "classify"}

    async def models(self) -> ModelList:
        return ModelList(data=[await self._classify_entry()])

    async def _classify_entry(self) -> ModelEntry:
        teacher = await self._teacher_details()
        student = self.slot.active
        stats = self.slot.stats
        manifest = student.model.manifest
        info = ClassifyCascadeInfo(
            student=ModelInfo(
                version=student.version,
                labels=student.model.labels,
                max_tokens=student.model.max_tokens,
            ),
            teacher=ModelInfo(**{k: v for k, v in teacher.items() if k != "path"}),
            scorer=self.config.cascade.scorer,
            threshold=student.rule.value,
            threshold_rule=student.rule.description,
            audit_fraction=self.config.cascade.audit_fraction,
            swap=SwapStatus(
                loading=stats.loading,
                swaps=stats.swaps,
                failures=stats.failures,
                superseded=stats.superseded,
                last_error=stats.last_error,
                last_swap_seconds=stats.last_swap_seconds,
                following=self.follower.following if self.follower else "its student.path",
                pointer=self.follower.pointer if self.follower else None,
            ),
        )
        return ModelEntry(
            id=self.config.cascade.name,
            created=int(manifest.created_at) if manifest else self.started,
            protege=info,
        )

    # --- the two models -------------------------------------------------------------------

    async def _student_batch(self, texts: list[str]) -> list[StudentRow]:
        student = self.slot.active  # read once: a swap during this batch does not split it
        self.metrics.observe("protege_batch_size", len(texts), model="student")
        prediction = await asyncio.to_thread(student.model.predict, texts)
        return [
            (p, cut, student) for p, cut in zip(prediction.probs, prediction.truncated, strict=True)
        ]

    async def _ask_teacher(self, texts: list[str], timeout: float) -> list[dict[str, Any]]:
        call = self.teacher.predict.remote(texts)  # one handle call per request
        try:
            return list(await asyncio.wait_for(call, timeout))
        except BaseException:
            call.cancel()
            raise

    async def _teacher_details(self) -> dict[str, Any]:
        if self._teacher_info is None:
            call = self.teacher.info.remote()
            try:
                info = await asyncio.wait_for(call, TEACHER_INFO_TIMEOUT_S)
            except BaseException:
                call.cancel()
                raise
            if info["labels"] != self.labels:
                raise RuntimeError(
                    f"teacher labels {info['labels']} differ from the student's {self.labels}"
                )
            self._teacher_info = info
            self._publish_serving()
        return self._teacher_info

    def __del__(self) -> None:
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
