"""The student alone on plain uvicorn, no Ray: the benchmark's floor for per-request cost.

python -m protege.plain_student --model var/cache/models/student --port 8300
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from serving.classify.classifier import Classifier
from serving.classify.decision import decide, make_output
from serving.schemas import ClassifyRequest, ClassifyResponse


def create_app(folder: Path, scorer: str = "max_prob") -> FastAPI:
    model = Classifier(folder)
    model.warm_up()
    app = FastAPI()
    lock = asyncio.Lock()

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/classify")
    async def classify(request: ClassifyRequest) -> ClassifyResponse:
        async with lock:
            prediction = model.predict(request.texts)
        decision = decide(prediction.probs, scorer, 0.0, "student")
        outputs = [
            make_output(
                row,
                model.labels,
                confidence=decision.confidence[i],
                tier="student",
                version=model.version,
                escalated=False,
                truncated=prediction.truncated[i],
            )
            for i, row in enumerate(prediction.probs)
        ]
        return ClassifyResponse(request_id="plain", outputs=outputs)

    return app


def main() -> None:
    args = argparse.ArgumentParser()
    args.add_argument("--model", type=Path, required=True)
    args.add_argument("--port", type=int, default=8300)
    args.add_argument("--threads", type=int, default=1)
    ns = args.parse_args()
    torch.set_num_threads(ns.threads)
    uvicorn.run(
        create_app(ns.model), host="127.0.0.1", port=ns.port, access_log=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
