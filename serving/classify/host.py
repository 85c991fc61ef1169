"""The classification cascade inside a gateway replica: its student (in the replica,
batched across requests), the teacher handle, the slot and its registry follower, its log,
its teacher probe and its serving gauges.

The student runs inside the ingress replica so that a request the student keeps costs one
proxy hop and no handle call (each hop costs milliseconds of CPU on a small machine);
concurrent requests are batched by ``serving.batcher`` (a batch forms when the model is
free). Only escalated inputs cross to the teacher deployment, one handle call a request.
The cascade's orchestration is ``serving.classify.service``; the gateway
(``serving.gateway``) creates this host when its config names a classification cascade.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from serving.batcher import Batcher
from serving.classify.service import Answer, CascadeService, Routing, StudentRow
from serving.config import GatewayConfig, ModelSpec
from serving.follow import Following, first_student, open_registry
from serving.hot_swap import ActiveStudent, StudentSlot, import_loader
from serving.http_api import Readiness
from serving.log_sink import LogSink
from serving.metrics import GatewayMetrics
from serving.schemas import ClassifyCascadeInfo, ModelEntry, ModelInfo
from serving.teacher_probe import TeacherProbe

logger = logging.getLogger("ray.serve")
TEACHER_INFO_TIMEOUT_S = 10.0  # the teacher's info (a control call, not teacher_timeout_s)


class ClassifyHost:
    def __init__(
        self,
        config: GatewayConfig,
        teacher: DeploymentHandle,
        metrics: GatewayMetrics,
        replica: str,
        started: int,
    ) -> None:
        assert config.student is not None, "a classification cascade needs its student"
        self.config = config
        self.name = config.cascade.name
        self.teacher = teacher
        self.metrics = metrics
        self.started = started  # an entry's `created` without a manifest
        registry = open_registry(
            config.registry,
            config.registry_cache_dir,
            config.s3_endpoint,
            lambda version: metrics.inc("protege_versions_refused"),
        )
        loader = import_loader(config.student_loader)
        student: ModelSpec = config.student

        def load(folder: Path) -> ActiveStudent:
            return loader(folder, config.cascade, config.device, student.max_tokens, None)

        initial = first_student(registry, student.path, load)
        slot = StudentSlot(
            initial,
            config.cascade,
            config.device,
            student.max_tokens,
            loader,
            on_result=self._swapped,
        )
        self.following = Following(slot, registry)
        self.labels = initial.model.labels
        self.student_batcher: Batcher[str, StudentRow] = Batcher(
            self._student_batch,
            config.batching.max_batch_size,
            config.batching.batch_wait_timeout_s,
        )
        # an unusable log folder is counted and retried, never fatal
        self.log = LogSink(config.log, replica, metrics, config.s3_endpoint)
        self.service = CascadeService(
            config,
            self.labels,
            self.student_batcher.submit,
            self._ask_teacher,
            self.log,
            metrics,
        )
        self._teacher_info: dict[str, Any] | None = None
        self.teacher_probe = TeacherProbe(
            self.service, self._teacher_details, config.teacher_unready_after_s
        )
        self._serving: tuple[str, str] | None = None
        self.publish_serving()
        logger.info("student %s ready (%s)", initial.version, initial.rule.description)

    @property
    def slot(self) -> StudentSlot:
        return self.following.slot

    async def classify(self, texts: list[str], request_id: str, routing: Routing) -> Answer:
        return await self.service.classify(texts, request_id, routing)

    async def readiness(self) -> Readiness:
        """Ready when the teacher is up and has not been failing for longer than
        ``teacher_unready_after_s``; the teacher is probed on a timer, never per caller."""
        return await self.teacher_probe.readiness(self.slot.active.version)

    async def entry(self) -> ModelEntry:
        """This cascade's ``/v1/models`` entry."""
        teacher = await self._teacher_details()
        student = self.slot.active
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
            swap=self.following.status(),
        )
        return ModelEntry(
            id=self.name,
            created=int(manifest.created_at) if manifest else self.started,
            protege=info,
        )

    # --- the serving gauges ---------------------------------------------------------------

    def _swapped(self, result: str, seconds: float) -> None:
        self.metrics.inc("protege_hot_swaps", result=result)
        self.metrics.observe("protege_hot_swap_duration_seconds", seconds)
        self.publish_serving()

    def publish_serving(self) -> None:
        """The versions, threshold and eval figures now serving (Ray exports a gauge only
        while it is being set: the gateway calls this on a timer too)."""
        student = self.slot.active
        teacher = self._teacher_info["version"] if self._teacher_info else "unknown"
        manifest = student.model.manifest
        figures = {k: v for k, v in (manifest.eval if manifest else {}).items() if 0 <= v <= 1}
        self.metrics.serving(student.version, teacher, student.rule.value, figures, self._serving)
        self._serving = (student.version, teacher)

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
            self.publish_serving()
        return self._teacher_info

    def close(self) -> None:
        self.log.close()
