"""Config sections that know no kind: batching, the log, access.

They sit apart from :mod:`serving.config` so that a kind's own config
(:mod:`serving.generate.config`) can use them while :mod:`serving.config` hangs that kind's
config on the gateway's, with no import cycle; and so that the shared request path
(:mod:`serving.access`, :mod:`serving.log_sink`) reads its settings without importing a kind.
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


class AccessConfig(_Strict):
    """API keys for inference. Fails closed: the gateway refuses to start without a key,
    and a configured source that holds none (an empty key file, the variable set to ``[]``)
    is an error naming it. Open access is ``required: false``, for local runs only."""

    keys_file: Path | None = Field(
        default=None, description="YAML or JSON list of {name, sha256, overrides} (hashed keys)"
    )
    keys_env: str = Field(
        default="PROTEGE_API_KEYS",
        description="Environment variable holding the same list as JSON (a Kubernetes Secret)",
    )
    required: bool = Field(
        default=True,
        description="Refuse to start without an API key; false: with no key source "
        "configured, any client may call the API (a local gateway on 127.0.0.1, never a cluster)",
    )
    anonymous_overrides: bool = Field(
        default=False,
        description="With authentication off, whether clients may send routing overrides "
        "(force_tier, threshold)",
    )
