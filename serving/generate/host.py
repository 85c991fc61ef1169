"""The generative cascade inside a gateway replica: its student slot (loaded by
:func:`serving.generate.student.load_student`) and, with its own registry, the pointer
follower; its log in its own folder; the generation service over its teacher (the teacher
deployment's handle, or a remote OpenAI-compatible server); its teacher probe and its
``/v1/models`` entry.

The gateway (``serving.gateway``) creates this host when its config has a ``generate``
section, and the OpenAI-compatible routes (:mod:`serving.generate.openai_api`) reach the
service through it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ray.serve.handle import DeploymentHandle

from serving.follow import Following, first_student, open_registry
from serving.generate.config import GenerateCascadeConfig, RemoteTeacherSpec
from serving.generate.remote_teacher import RemoteTeacher, api_key
from serving.generate.service import GenerationService
from serving.generate.student import GenerativeStudent, load_student
from serving.generate.teacher import HandleTeacher
from serving.generate.teacher_engine import TeacherClient
from serving.hot_swap import ActiveStudent, StudentSlot
from serving.http_api import Readiness
from serving.log_sink import LogSink
from serving.metrics import ReplicaMetrics
from serving.schemas import GenerateCascadeInfo, ModelEntry, VersionInfo
from serving.teacher_probe import TeacherProbe

logger = logging.getLogger("ray.serve")


def teacher_client(
    config: GenerateCascadeConfig, deployment: DeploymentHandle | None
) -> TeacherClient:
    """The cascade's teacher: a remote server, or the teacher deployment's handle."""
    spec = config.teacher
    if isinstance(spec, RemoteTeacherSpec):
        return RemoteTeacher(spec.url, spec.model, api_key(spec.api_key_env), spec.tokenizer)
    if deployment is None:
        raise ValueError("the generative cascade needs its teacher deployment")
    return HandleTeacher(deployment)


class GenerateHost:
    def __init__(
        self,
        config: GenerateCascadeConfig,
        teacher: DeploymentHandle | None,
        metrics: ReplicaMetrics,
        *,
        replica: str,
        started: int,
        device: str,
        s3_endpoint: str | None,
        unready_after_s: float,
    ) -> None:
        self.config = config
        self.name = config.name
        self.metrics = metrics
        self.started = started  # an entry's `created` without a manifest
        registry = open_registry(
            config.registry,
            config.registry_cache_dir,
            s3_endpoint,
            lambda version: metrics.inc("protege_versions_refused"),
        )

        def load(folder: Path) -> ActiveStudent:
            return load_student(folder, config, device)

        initial = first_student(registry, config.student.path, load)
        slot = StudentSlot(initial, config, device, None, load_student, on_result=self._swapped)
        self.following = Following(slot, registry)
        # its own folder: an unusable one is counted and retried, never fatal
        self.log = LogSink(config.log, replica, metrics, s3_endpoint)
        self.service = GenerationService(
            config,
            lambda: self.following.slot.active,
            teacher_client(config, teacher),
            self.log,
            metrics,
        )
        self.teacher_probe = TeacherProbe(self.service, self._teacher_details, unready_after_s)
        logger.info("generative student %s ready (%s)", initial.version, initial.rule.description)

    @property
    def slot(self) -> StudentSlot:
        return self.following.slot

    async def readiness(self) -> Readiness:
        """Ready when the teacher answers and has not been failing for longer than
        ``teacher_unready_after_s`` (probed on a timer, as the classification teacher)."""
        return await self.teacher_probe.readiness(self.slot.active.version)

    async def entry(self) -> ModelEntry:
        """This cascade's ``/v1/models`` entry."""
        teacher = await self.service.teacher_info()
        active = self.slot.active
        student: GenerativeStudent = active.model
        info = GenerateCascadeInfo(
            student=VersionInfo(version=student.version),
            teacher=VersionInfo(version=teacher.version),
            scorer=self.config.scorer,
            threshold=active.rule.value,
            threshold_rule=active.rule.description,
            audit_fraction=self.config.audit_fraction,
            swap=self.following.status("its generate.student.path"),
            agreement_cut=self.config.agreement_cut,
            max_prompt_tokens=student.max_prompt_tokens,
            max_new_tokens=student.max_new_tokens,
        )
        manifest = student.manifest
        return ModelEntry(
            id=self.name,
            created=int(manifest.created_at) if manifest else self.started,
            protege=info,
        )

    async def _teacher_details(self) -> dict[str, Any]:
        return {"version": (await self.service.teacher_info()).version}

    def _swapped(self, result: str, seconds: float) -> None:
        self.metrics.inc("protege_hot_swaps", result=result)
        self.metrics.observe("protege_hot_swap_duration_seconds", seconds)

    def close(self) -> None:
        self.log.close()
