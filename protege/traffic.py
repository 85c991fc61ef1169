"""Send texts to a gateway with concurrent clients and measure what comes back."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from serving.client import AsyncProtegeClient
from serving.schemas import ClassifyOutput, Tier


@dataclass
class Run:
    outputs: list[ClassifyOutput | None] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)  # one per request
    tiers: list[str] = field(default_factory=list)  # tier of each single-input request
    failures: int = 0
    seconds: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latency_s) / self.seconds if self.seconds else 0.0

    def latency_ms(self, tier: str | None = None, q: float = 50) -> float:
        values = [
            lat for lat, t in zip(self.latency_s, self.tiers, strict=True) if tier in (None, t)
        ]
        return float(np.percentile(values, q) * 1000) if values else float("nan")


async def _send_all(
    url: str,
    texts: list[str],
    concurrency: int,
    force_tier: Tier | None,
    batch: int,
    api_key: str | None,
    threshold: float | None = None,
) -> Run:
    run = Run(outputs=[None] * len(texts), latency_s=[], tiers=[])
    queue: asyncio.Queue[int] = asyncio.Queue()
    for start in range(0, len(texts), batch):
        queue.put_nowait(start)
    async with AsyncProtegeClient(
        url, api_key=api_key, timeout=120, max_connections=concurrency
    ) as client:

        async def worker() -> None:
            while not queue.empty():
                start = queue.get_nowait()
                chunk = texts[start : start + batch]
                began = time.perf_counter()
                try:
                    result = await client.classify(
                        chunk, force_tier=force_tier, threshold=threshold
                    )
                except Exception:
                    run.failures += 1
                    continue
                run.latency_s.append(time.perf_counter() - began)
                run.tiers.append(result.outputs[0].tier if len(chunk) == 1 else "batch")
                run.outputs[start : start + len(chunk)] = result.outputs

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.seconds = time.perf_counter() - began
    return run


def send(
    url: str,
    texts: list[str],
    *,
    concurrency: int = 8,
    force_tier: Tier | None = None,
    batch: int = 1,
    api_key: str | None = None,
    threshold: float | None = None,
) -> Run:
    """Send every text (``batch`` per request) over ``concurrency`` connections."""
    return asyncio.run(_send_all(url, texts, concurrency, force_tier, batch, api_key, threshold))
