"""Config sections that every kind's cascade uses: batching and the log.

They sit apart from :mod:`serving.config` so that a kind's own config
(:mod:`serving.generate.config`) can use them while :mod:`serving.config` hangs that kind's
config on the gateway's, with no import cycle.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt

from serving.contracts.storage import StoreURI

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchingConfig(_Strict):
    max_batch_size: PositiveInt = Field(default=32, description="Inputs per model forward pass")
    batch_wait_timeout_s: NonNegativeFloat = Field(
        default=0.005, description="How long a batch waits to fill"
    )


class LogConfig(_Strict):
    dir: Path = Field(default=Path("var/cache/escalations"), description="Escalation log folder")
    max_segment_bytes: PositiveInt = Field(default=DEFAULT_SEGMENT_BYTES)
    fsync_interval_s: PositiveFloat = Field(default=1.0)
    ship_to: StoreURI | None = Field(
        default=None,
        description="Shared storage for finished segments (s3://bucket/prefix or a folder "
        "every node mounts); unset: the log stays in `dir`",
    )
    ship_every_s: PositiveFloat = Field(
        default=60.0, description="A segment is finished and shipped at least this often"
    )
