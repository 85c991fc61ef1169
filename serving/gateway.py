"""The ingress deployment: HTTP API, the student (in this replica), the cascade, the log.

The student runs inside the ingress replica so that a request the student keeps costs one
proxy hop and no handle call (each hop costs milliseconds of CPU on a small machine);
concurrent requests are batched per input with ``@serve.batch``. Only escalated inputs
cross to the teacher deployment.
"""

import asyncio
import contextlib
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Header, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.cascade import Decision, decide, make_output, make_record
from serving.config import GatewayConfig, SwapRequest
from serving.errors import InputError, install_error_handlers
from serving.escalation_log import EscalationLogWriter, EscalationRecord, Reason, TeacherStatus
from serving.hot_swap import ActiveStudent, StudentSlot, import_loader, without_paths
from serving.metrics import GatewayMetrics
from serving.registry import Registry
from serving.schemas import (
    ClassifyOutput,
    ClassifyRequest,
    ClassifyResponse,
    ModelInfo,
    ModelsResponse,
    SwapStatus,
)

logger = logging.getLogger("ray.serve")
LOG_RETRY_S = 5.0  # how often an unusable log folder is tried again
SERVING_GAUGES_EVERY_S = 5.0

api = FastAPI(
    title="protege",
    summary="A student answers; the unsure inputs escalate to the teacher.",
    version="1",
)
install_error_handlers(api)


def steered(request: ClassifyRequest) -> bool:
    """The client chose the routing (a forced tier or its own threshold): its escalations
    are logged and counted as forced, not as the student's low confidence."""
    return request.force_tier == "teacher" or request.threshold is not None


@dataclass
class StudentAnswers:
    """The student's side of one request: per input, its probabilities and the version (and
    so the threshold) that produced them; a swap may land between two inputs' batches."""

    request_id: str
    texts: list[str]
    probs: np.ndarray
    truncated: list[bool]
    students: list[ActiveStudent]
    override: float | None

    @cached_property
    def thresholds(self) -> np.ndarray:
        if self.override is not None:
            return np.full(len(self.texts), self.override)
        return np.array([s.rule.value for s in self.students])


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
@serve.ingress(api)
class Gateway:
    def __init__(self, config: GatewayConfig, teacher: DeploymentHandle) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.teacher = teacher
        self.registry = Registry(config.registry) if config.registry else None
        loader = import_loader(config.student_loader)
        initial = loader(
            self._initial_folder(), config.cascade, config.device, config.student.max_tokens, None
        )
        self.metrics = GatewayMetrics()
        self.slot = StudentSlot(
            initial,
            config.cascade,
            config.device,
            config.student.max_tokens,
            loader,
            on_result=self._swapped,
        )
        self.labels = initial.model.labels
        self._student_batch.set_max_batch_size(config.batching.max_batch_size)  # type: ignore[attr-defined]
        self._student_batch.set_batch_wait_timeout_s(config.batching.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._replica = serve.get_replica_context().replica_tag
        self.log: EscalationLogWriter | None = None
        self._log_retry_at = 0.0
        self._open_log()  # an unwritable folder is counted and retried, never fatal
        self._background: set[asyncio.Task[None]] = set()
        self._teacher_info: dict[str, Any] | None = None
        self._teacher_failing_since: float | None = None  # monotonic time of the first failure
        self._serving: tuple[str, str] | None = None
        self._publish_serving()
        # Ray exports a gauge only while it is being set: re-publish what serves, so the
        # versions, threshold and eval figures stay visible between swaps
        self._stopped = threading.Event()
        threading.Thread(target=self._republish, daemon=True, name="serving-gauges").start()
        logger.info("student %s ready (%s)", initial.version, initial.rule.description)

    def _republish(self) -> None:
        while not self._stopped.wait(SERVING_GAUGES_EVERY_S):
            self._publish_serving()

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

    def _initial_folder(self) -> Path:
        current = self.registry.current() if self.registry else None
        return (
            self.registry.path(current) if self.registry and current else self.config.student.path
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's in-place update: swap to ``student_version`` in the background, or, with
        only ``threshold`` (or nothing), re-apply the serving version's threshold rule."""
        try:
            swap = SwapRequest.model_validate(user_config)
            version = swap.student_version or self.slot.active.version
            if swap.student_version is None:
                folder = self.slot.active.model.folder
            elif self.registry is None:
                raise ValueError("student_version in user_config needs `registry` in the config")
            else:
                folder = self.registry.path(swap.student_version)
        except Exception as exc:  # a bad update never takes the replica down
            self.slot.stats.failures += 1
            reason = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            self.slot.stats.last_error = without_paths(f"user_config refused: {reason}")
            self.metrics.inc("protege_hot_swaps", result="failure")
            logger.error("hot swap refused: %s", exc)
            return
        self.slot.request(version, folder, swap.threshold)

    # --- HTTP -----------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz(self, response: Response) -> dict[str, Any]:
        """Ready when the teacher is up and has not been failing for longer than
        ``teacher_unready_after_s`` (a failing teacher is probed again here, so readiness
        comes back as soon as it answers)."""
        try:
            teacher = await self._teacher_details()
            failing = await self._teacher_failing_for()
        except Exception as exc:  # the teacher is not up (yet): not ready, but alive
            response.status_code = 503
            return {"status": "not ready", "reason": f"teacher unavailable: {exc!r:.200}"}
        if failing is not None and failing >= self.config.teacher_unready_after_s:
            response.status_code = 503
            return {
                "status": "not ready",
                "reason": f"teacher failing for {failing:.0f} s (answers are degraded)",
            }
        return {
            "status": "ready",
            "student": self.slot.active.version,
            "teacher": teacher["version"],
        }

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        teacher = await self._teacher_details()
        student = self.slot.active
        stats = self.slot.stats
        return ModelsResponse(
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
            ),
        )

    @api.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(
        self,
        request: ClassifyRequest,
        response: Response,
        x_request_id: str | None = Header(default=None, max_length=128),
    ) -> ClassifyResponse:
        began = time.perf_counter()
        try:
            self._check_limits(request.inputs)
        except InputError:
            self.metrics.rejected()
            raise
        # Serve's proxy adopts a client's x-request-id and echoes it in the response
        request_id = x_request_id or serve.context._get_serve_request_context().request_id
        outputs = await self._cascade(request, request_id or uuid.uuid4().hex)
        self.metrics.request(
            [o.tier for o in outputs],
            [o.degraded for o in outputs],
            [o.confidence for o in outputs],
            [self._reason(o, request) for o in outputs],
            time.perf_counter() - began,
        )
        if len(outputs) == 1:
            response.headers["x-protege-tier"] = outputs[0].tier
            response.headers["x-protege-model-version"] = outputs[0].model_version
        return ClassifyResponse(request_id=request_id, outputs=outputs)

    @staticmethod
    def _reason(output: ClassifyOutput, request: ClassifyRequest) -> str | None:
        if not output.escalated:
            return None
        return "forced" if steered(request) else "low_confidence"

    # --- the cascade ----------------------------------------------------------------------

    async def _cascade(self, request: ClassifyRequest, request_id: str) -> list[ClassifyOutput]:
        texts = request.inputs
        began = time.perf_counter()
        rows = await asyncio.gather(*(self._student_batch(t) for t in texts))
        self.metrics.observe(
            "protege_stage_latency_seconds", time.perf_counter() - began, stage="student"
        )
        batch = StudentAnswers(
            request_id=request_id,
            texts=texts,
            probs=np.stack([r[0] for r in rows]),
            truncated=[r[1] for r in rows],
            students=[r[2] for r in rows],
            override=request.threshold,
        )
        decision = decide(
            batch.probs, self.config.cascade.scorer, batch.thresholds, request.force_tier
        )
        escalated = np.flatnonzero(decision.escalate).tolist()
        answers, status = (
            await self._ask_teacher([texts[i] for i in escalated]) if escalated else (None, None)
        )
        by_teacher = dict(zip(escalated, answers, strict=True)) if answers else {}
        degraded = bool(escalated) and answers is None

        outputs = [
            self._teacher_output(by_teacher[i], decision.confidence[i])
            if i in by_teacher
            else self._student_output(batch, decision, i, degraded)
            for i in range(len(texts))
        ]
        records = []
        if escalated:  # logged even when the teacher failed: the job labels those offline
            assert decision.reason is not None  # set whenever anything escalates
            reason: Reason = "forced" if steered(request) else decision.reason
            records = [
                self._record(batch, decision, i, by_teacher.get(i), reason, 1.0, status)
                for i in escalated
            ]
        records += self._maybe_audit(batch, decision)
        if records:  # flushed to the kernel before the response leaves
            await self._write(records)
        return outputs

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _student_batch(
        self, texts: list[str]
    ) -> list[tuple[np.ndarray, bool, ActiveStudent]]:
        student = self.slot.active  # read once: a swap during this batch does not split it
        self.metrics.observe("protege_batch_size", len(texts), model="student")
        prediction = await asyncio.to_thread(student.model.predict, texts)
        return [
            (p, cut, student) for p, cut in zip(prediction.probs, prediction.truncated, strict=True)
        ]

    async def _ask_teacher(
        self, texts: list[str]
    ) -> tuple[list[dict[str, Any]] | None, TeacherStatus]:
        """The teacher's answers, or None and why when it fails or times out (the student
        then answers, marked degraded)."""
        calls = [self.teacher.predict_one.remote(t) for t in texts]
        began = time.perf_counter()
        try:
            answers = list(
                await asyncio.wait_for(asyncio.gather(*calls), self.config.teacher_timeout_s)
            )
            self.metrics.observe(
                "protege_stage_latency_seconds", time.perf_counter() - began, stage="teacher"
            )
            self._teacher_failing_since = None
            return answers, "answered"
        except Exception as exc:  # timeout, dead replica, model error: the student answers
            kind: TeacherStatus = (
                "timeout" if isinstance(exc, asyncio.TimeoutError | TimeoutError) else "failed"
            )
            self.metrics.inc("protege_teacher_failures", kind="error" if kind == "failed" else kind)
            for call in calls:
                call.cancel()
            if self._teacher_failing_since is None:
                self._teacher_failing_since = time.monotonic()
            logger.warning("teacher failed for %d inputs: %r", len(texts), exc)
            return None, kind

    def _teacher_output(self, answer: dict[str, Any], confidence: float) -> ClassifyOutput:
        return make_output(
            np.asarray(answer["probs"]),
            self.labels,
            confidence=confidence,
            tier="teacher",
            version=answer["version"],
            escalated=True,
            truncated=answer["truncated"],
        )

    def _student_output(
        self, batch: StudentAnswers, decision: Decision, i: int, teacher_failed: bool
    ) -> ClassifyOutput:
        escalated = bool(decision.escalate[i])
        return make_output(
            batch.probs[i],
            self.labels,
            confidence=decision.confidence[i],
            tier="student",
            version=batch.students[i].version,
            escalated=escalated,
            degraded=teacher_failed and escalated,
            truncated=batch.truncated[i],
        )

    def _record(
        self,
        batch: StudentAnswers,
        decision: Decision,
        i: int,
        answer: dict[str, Any] | None,
        reason: Reason,
        inclusion_probability: float,
        status: TeacherStatus | None,
    ) -> EscalationRecord:
        return make_record(
            request_id=batch.request_id,
            text=batch.texts[i],
            reason=reason,
            inclusion_probability=inclusion_probability,
            labels=self.labels,
            student_version=batch.students[i].version,
            student_probs=batch.probs[i],
            scorer=self.config.cascade.scorer,
            confidence=decision.confidence[i],
            threshold=float(batch.thresholds[i]),
            teacher=answer,
            teacher_status=status or "skipped",
        )

    # --- audit and log --------------------------------------------------------------------

    def _maybe_audit(self, batch: StudentAnswers, decision: Decision) -> list[EscalationRecord]:
        """Log a uniform sample of the confident inputs, each with probability
        ``audit_fraction``: with the student's answer only (returned, for the job to ask the
        teacher offline, in batch), or with the teacher's, asked off the response path."""
        cascade = self.config.cascade
        if cascade.audit_fraction <= 0:
            return []
        chosen = [
            int(i)
            for i in np.flatnonzero(~decision.escalate)
            if random.random() < cascade.audit_fraction
        ]
        if not chosen:
            return []
        self.metrics.inc("protege_escalations", len(chosen), reason="audit")
        if cascade.audit_teacher == "offline":
            return [self._audit_record(batch, decision, i, None, "skipped") for i in chosen]
        task = asyncio.create_task(self._audit(batch, decision, chosen))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return []

    async def _audit(self, batch: StudentAnswers, decision: Decision, chosen: list[int]) -> None:
        answers, status = await self._ask_teacher([batch.texts[i] for i in chosen])
        by_index = dict(zip(chosen, answers, strict=True)) if answers else {}
        for i, answer in by_index.items():
            agree = int(np.argmax(answer["probs"])) == int(np.argmax(batch.probs[i]))
            self.metrics.inc("protege_audits", agreement="agree" if agree else "disagree")
        await self._write(
            [self._audit_record(batch, decision, i, by_index.get(i), status) for i in chosen]
        )

    def _audit_record(
        self,
        batch: StudentAnswers,
        decision: Decision,
        i: int,
        answer: dict[str, Any] | None,
        status: TeacherStatus,
    ) -> EscalationRecord:
        fraction = self.config.cascade.audit_fraction
        return self._record(batch, decision, i, answer, "audit", fraction, status)

    def _open_log(self) -> None:
        log = self.config.log
        try:
            self.log = EscalationLogWriter(
                log.dir,
                writer_id=self._replica,
                max_segment_bytes=log.max_segment_bytes,
                fsync_interval_s=log.fsync_interval_s,
            )
        except OSError as exc:
            self._log_retry_at = time.monotonic() + LOG_RETRY_S
            self.metrics.inc("protege_log_write_errors")
            logger.error("escalation log folder unusable, serving on without it: %s", exc)

    async def _write(self, records: list[EscalationRecord]) -> None:
        """Append off the event loop (a slow disk must not stall other requests); a failed
        write is counted and alerted, and serving goes on."""
        if self.log is None and time.monotonic() >= self._log_retry_at:
            self._open_log()
        log = self.log
        if log is None:
            self.metrics.inc("protege_log_write_errors")
            return
        before = (log.bytes_written, log.rotations)
        try:
            await asyncio.to_thread(log.append, records)
        except Exception:  # never a failed request: counted, alerted, the writer reopened
            self.metrics.inc("protege_log_write_errors")
            logger.exception("escalation log write failed for %d records", len(records))
            self.log, self._log_retry_at = None, time.monotonic() + LOG_RETRY_S
            with contextlib.suppress(Exception):
                log.close()
            return
        self.metrics.log_written(
            len(records), log.bytes_written - before[0], log.rotations - before[1]
        )

    # --- helpers --------------------------------------------------------------------------

    def _check_limits(self, inputs: list[str]) -> None:
        limits = self.config.limits
        if not inputs:
            raise InputError("inputs", "must hold at least one text")
        if len(inputs) > limits.max_inputs:
            raise InputError(
                "inputs",
                f"{len(inputs)} texts, more than the maximum of {limits.max_inputs} per request",
            )
        for i, text in enumerate(inputs):
            if not text.strip():
                raise InputError(f"inputs.{i}", "is empty or only whitespace")
            if len(text) > limits.max_chars:
                raise InputError(
                    f"inputs.{i}",
                    f"{len(text)} characters, more than the maximum of {limits.max_chars}",
                )

    async def _teacher_failing_for(self) -> float | None:
        """Seconds the teacher has failed every call, after one probe; None when it works."""
        if self._teacher_failing_since is None:
            return None
        answers, _ = await self._ask_teacher(["readiness probe"])
        if answers is not None:
            return None
        since = self._teacher_failing_since
        return None if since is None else time.monotonic() - since

    async def _teacher_details(self) -> dict[str, Any]:
        if self._teacher_info is None:
            info = await self.teacher.info.remote()
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
