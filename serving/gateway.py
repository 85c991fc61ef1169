"""The ingress deployment: HTTP API, the student (in this replica), the cascade, the log.

The student runs inside the ingress replica so that a request the student keeps costs one
proxy hop and no handle call (each hop costs milliseconds of CPU on a small machine);
concurrent requests are batched per input with ``@serve.batch``. Only escalated inputs
cross to the teacher deployment.
"""

import asyncio
import logging
import random
import uuid
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Header, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.cascade import (
    Decision,
    ThresholdRule,
    decide,
    make_output,
    make_record,
    resolve_threshold,
)
from serving.classifier import Classifier
from serving.config import GatewayConfig
from serving.errors import InputError, install_error_handlers
from serving.escalation_log import EscalationLogWriter, EscalationRecord, Reason
from serving.schemas import (
    ClassifyOutput,
    ClassifyRequest,
    ClassifyResponse,
    ModelInfo,
    ModelsResponse,
)

logger = logging.getLogger("ray.serve")

api = FastAPI(
    title="protege",
    summary="A student answers; the unsure inputs escalate to the teacher.",
    version="1",
)
install_error_handlers(api)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
@serve.ingress(api)
class Gateway:
    def __init__(self, config: GatewayConfig, teacher: DeploymentHandle) -> None:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.teacher = teacher
        self.student = Classifier(
            config.student.path, device=config.device, max_tokens=config.student.max_tokens
        )
        self.rule: ThresholdRule = resolve_threshold(config.cascade, self.student.manifest)
        self.student.warm_up()
        self._student_batch.set_max_batch_size(config.batching.max_batch_size)  # type: ignore[attr-defined]
        self._student_batch.set_batch_wait_timeout_s(config.batching.batch_wait_timeout_s)  # type: ignore[attr-defined]
        replica = serve.get_replica_context().replica_tag
        self.log = EscalationLogWriter(
            config.log.dir,
            writer_id=replica,
            max_segment_bytes=config.log.max_segment_bytes,
            fsync_interval_s=config.log.fsync_interval_s,
        )
        self._background: set[asyncio.Task[None]] = set()
        self._teacher_info: dict[str, Any] | None = None
        logger.info(
            "student %s ready, threshold %.4f (%s)",
            self.student.version,
            self.rule.value,
            self.rule.description,
        )

    # --- HTTP -----------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz(self, response: Response) -> dict[str, Any]:
        try:
            teacher = await self._teacher_details()
        except Exception as exc:  # the teacher is not up (yet): not ready, but alive
            response.status_code = 503
            return {"status": "not ready", "reason": f"teacher unavailable: {exc!r:.200}"}
        return {"status": "ready", "student": self.student.version, "teacher": teacher["version"]}

    @api.get("/v1/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        teacher = await self._teacher_details()
        return ModelsResponse(
            student=ModelInfo(
                version=self.student.version,
                path=str(self.student.folder),
                labels=self.student.labels,
                max_tokens=self.student.max_tokens,
            ),
            teacher=ModelInfo(**teacher),
            scorer=self.config.cascade.scorer,
            threshold=self.rule.value,
            threshold_rule=self.rule.description,
            audit_fraction=self.config.cascade.audit_fraction,
        )

    @api.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(
        self,
        request: ClassifyRequest,
        response: Response,
        x_request_id: str | None = Header(default=None, max_length=128),
    ) -> ClassifyResponse:
        self._check_limits(request.inputs)
        # Serve's proxy adopts a client's x-request-id and echoes it in the response
        request_id = x_request_id or serve.context._get_serve_request_context().request_id
        outputs = await self._cascade(request, request_id or uuid.uuid4().hex)
        if len(outputs) == 1:
            response.headers["x-protege-tier"] = outputs[0].tier
            response.headers["x-protege-model-version"] = outputs[0].model_version
        return ClassifyResponse(request_id=request_id, outputs=outputs)

    # --- the cascade ----------------------------------------------------------------------

    async def _cascade(self, request: ClassifyRequest, request_id: str) -> list[ClassifyOutput]:
        texts = request.inputs
        rows = await asyncio.gather(*(self._student_batch(t) for t in texts))
        probs = np.stack([r[0] for r in rows])
        truncated = [r[1] for r in rows]
        threshold = request.threshold if request.threshold is not None else self.rule.value
        decision = decide(probs, self.config.cascade.scorer, threshold, request.force_tier)
        escalated = np.flatnonzero(decision.escalate).tolist()
        answers = await self._ask_teacher([texts[i] for i in escalated]) if escalated else None
        by_teacher = dict(zip(escalated, answers, strict=True)) if answers else {}
        degraded = bool(escalated) and answers is None

        outputs = []
        for i in range(len(texts)):
            if i in by_teacher:
                outputs.append(self._teacher_output(by_teacher[i], decision.confidence[i]))
            else:
                escalated_here = bool(decision.escalate[i])
                outputs.append(
                    self._student_output(
                        probs[i], decision, i, truncated[i], degraded and escalated_here
                    )
                )
        if by_teacher:
            assert decision.reason is not None  # set whenever anything escalates
            reason = decision.reason
            self._write(
                [
                    self._record(request_id, i, texts[i], decision, probs[i], threshold, a, reason)
                    for i, a in by_teacher.items()
                ]
            )
        self._maybe_audit(request_id, texts, probs, decision, threshold)
        return outputs

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _student_batch(self, texts: list[str]) -> list[tuple[np.ndarray, bool]]:
        prediction = await asyncio.to_thread(self.student.predict, texts)
        return list(zip(prediction.probs, prediction.truncated, strict=True))

    async def _ask_teacher(self, texts: list[str]) -> list[dict[str, Any]] | None:
        """The teacher's answers, or None when it fails or times out (answer degraded)."""
        calls = [self.teacher.predict_one.remote(t) for t in texts]
        try:
            return list(
                await asyncio.wait_for(asyncio.gather(*calls), self.config.teacher_timeout_s)
            )
        except Exception as exc:  # timeout, dead replica, model error: the student answers
            for call in calls:
                call.cancel()
            logger.warning("teacher failed for %d inputs, answering degraded: %r", len(texts), exc)
            return None

    def _teacher_output(self, answer: dict[str, Any], confidence: float) -> ClassifyOutput:
        return make_output(
            np.asarray(answer["probs"]),
            self.student.labels,
            confidence=confidence,
            tier="teacher",
            version=answer["version"],
            escalated=True,
            truncated=answer["truncated"],
        )

    def _student_output(
        self, probs: np.ndarray, decision: Decision, i: int, truncated: bool, degraded: bool = False
    ) -> ClassifyOutput:
        return make_output(
            probs,
            self.student.labels,
            confidence=decision.confidence[i],
            tier="student",
            version=self.student.version,
            escalated=bool(decision.escalate[i]),
            degraded=degraded,
            truncated=truncated,
        )

    def _record(
        self,
        request_id: str,
        i: int,
        text: str,
        decision: Decision,
        student_probs: np.ndarray,
        threshold: float,
        answer: dict[str, Any],
        reason: Reason,
    ) -> EscalationRecord:
        return make_record(
            request_id=request_id,
            index=i,
            text=text,
            reason=reason,
            labels=self.student.labels,
            student_version=self.student.version,
            student_probs=student_probs,
            scorer=self.config.cascade.scorer,
            confidence=decision.confidence[i],
            threshold=threshold,
            teacher_version=answer["version"],
            teacher_probs=answer["probs"],
        )

    # --- audit and log --------------------------------------------------------------------

    def _maybe_audit(
        self,
        request_id: str,
        texts: list[str],
        probs: np.ndarray,
        decision: Decision,
        threshold: float,
    ) -> None:
        fraction = self.config.cascade.audit_fraction
        if fraction <= 0:
            return
        chosen = [int(i) for i in np.flatnonzero(~decision.escalate) if random.random() < fraction]
        if chosen:
            task = asyncio.create_task(
                self._audit(request_id, texts, probs, decision, threshold, chosen)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _audit(
        self,
        request_id: str,
        texts: list[str],
        probs: np.ndarray,
        decision: Decision,
        threshold: float,
        chosen: list[int],
    ) -> None:
        answers = await self._ask_teacher([texts[i] for i in chosen])
        if answers is not None:
            self._write(
                [
                    self._record(request_id, i, texts[i], decision, probs[i], threshold, a, "audit")
                    for i, a in zip(chosen, answers, strict=True)
                ]
            )

    def _write(self, records: list[EscalationRecord]) -> None:
        try:
            self.log.append(records)
        except OSError:
            logger.exception("escalation log write failed for %d records", len(records))

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

    async def _teacher_details(self) -> dict[str, Any]:
        if self._teacher_info is None:
            info = await self.teacher.info.remote()
            if info["labels"] != self.student.labels:
                raise RuntimeError(
                    f"teacher labels {info['labels']} differ from the student's {self.student.labels}"
                )
            self._teacher_info = info
        return self._teacher_info

    def __del__(self) -> None:
        log = getattr(self, "log", None)
        if log is not None:
            log.close()
