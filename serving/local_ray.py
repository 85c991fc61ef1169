"""Start Ray and Serve on this machine, bound to 127.0.0.1 only.

Ray 2.60 binds the machine's non-loopback address unless told otherwise; tests, the demo
and the benchmark must never listen elsewhere. Usage stats are off.
"""

from __future__ import annotations

import os

LOOPBACK = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8080

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}


def start(
    http_port: int = DEFAULT_HTTP_PORT,
    metrics_port: int = DEFAULT_METRICS_PORT,
    num_cpus: int | None = None,
) -> None:
    """``ray.init`` a fresh local cluster on loopback and start Serve's HTTP proxy there."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    from ray import serve

    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=num_cpus,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
        runtime_env={"env_vars": {k: os.environ[k] for k in QUIET_ENV}},
    )
    serve.start(http_options={"host": LOOPBACK, "port": http_port}, logging_config={"enable_access_log": False})


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
