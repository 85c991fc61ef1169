"""Start Ray and Serve on this machine, bound to 127.0.0.1 only, and deploy configs.

Ray 2.60 binds the machine's non-loopback address unless told otherwise; tests, the demo
and the benchmark never listen elsewhere. Usage stats are off.

Two ingress modes:
- ``proxy``: Serve's Python HTTP proxy (the default of Ray).
- ``haproxy``: Ray's bundled HAProxy routes straight to the ingress replica, with
  throughput-optimized internals. Its costs are handled here: the 30 s drain on shutdown
  is cut for local runs, and its stats and metrics ports (which HAProxy binds on every
  interface, without auth) are moved to ports given by the caller.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

from serving.contracts.storage import is_remote

LOOPBACK = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8080
REQUEST_TIMEOUT_S = 30.0  # Serve answers 408 after this (the teacher times out at 10 s)

Ingress = Literal["proxy", "haproxy"]

QUIET_ENV = {
    # Ray's single-machine mode: every Ray process (raylet, GCS, agents, workers) then
    # resolves its node address to 127.0.0.1; `_node_ip_address` alone left the dashboard
    # and runtime-env agents on the machine's external address and gRPC on all interfaces.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # counters export once, as <name>_total (not also as a gauge of the same name)
    "RAY_EXPORT_COUNTER_AS_GAUGE": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def ingress_env(ingress: Ingress, haproxy_ports: tuple[int, int] = (9101, 8404)) -> dict[str, str]:
    if ingress == "proxy":
        return {}
    metrics_port, stats_port = haproxy_ports
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "120",
    }


def pin_loopback(env: dict[str, str] = QUIET_ENV) -> None:
    """Set Ray's single-machine environment before ``ray.init`` (Ray core only, no Serve)."""
    for key, value in env.items():
        os.environ.setdefault(key, value)
    from ray._private import ray_constants

    # Ray reads the flag once, at import: if this process imported Ray before the lines
    # above, the driver would still pick the external address and hand it to the agents.
    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"


def start(
    http_port: int = DEFAULT_HTTP_PORT,
    metrics_port: int | None = DEFAULT_METRICS_PORT,
    num_cpus: int | None = None,
    ingress: Ingress = "proxy",
    haproxy_ports: tuple[int, int] = (9101, 8404),
) -> None:
    """``ray.init`` a fresh local cluster on loopback and start Serve's HTTP ingress there."""
    check_metrics_port(metrics_port)
    env = {**QUIET_ENV, **ingress_env(ingress, haproxy_ports)}
    pin_loopback(env)
    import ray
    from ray import serve

    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=num_cpus,
        _metrics_export_port=metrics_port,
        log_to_driver=False,
        # the driver prints errors only: Ray's start-up notes (token auth on, instance
        # started) are noise on a terminal; the replicas' own logs stay in Ray's session
        logging_level=logging.ERROR,
        runtime_env={"env_vars": {k: os.environ[k] for k in env}},
    )
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's start-up notes
    serve.start(
        http_options={
            "host": LOOPBACK,
            "port": http_port,
            "request_timeout_s": REQUEST_TIMEOUT_S,
        },
        logging_config={"enable_access_log": False},
    )
    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def check_metrics_port(port: int | None) -> None:
    """Prometheus scrapes Ray's metrics agent on this port: it must be set and valid."""
    if port is None:
        raise ValueError(
            "metrics_port is required: Ray exports the gateway's metrics there (Prometheus "
            f"scrapes it); for example --metrics-port {DEFAULT_METRICS_PORT}"
        )
    if not 1024 <= port <= 65535 or 10002 <= port <= 19999:
        raise ValueError(
            f"metrics_port {port} is not usable: pick 1024-65535 outside 10002-19999 "
            "(Ray's worker ports)"
        )


def deploy_config(config: dict[str, Any], base: Path, timeout_s: float = 300.0) -> None:
    """Deploy a Serve config file's applications through the controller's config path, and
    wait until every one runs (Ray's own wait gives up after 60 s, too short for several
    large models loading on 2 cores); a failed deployment raises with Serve's message.

    This is the path ``serve deploy`` and KubeRay use: a later deploy that changes only a
    deployment's ``user_config`` updates live replicas in place instead of restarting them.
    Relative model and log paths are made absolute against ``base``.
    """
    from ray import serve
    from ray.serve import context
    from ray.serve.schema import ServeDeploySchema

    for app in config.get("applications", []):
        app["args"] = absolute_paths(app.get("args", {}), base)
    schema = ServeDeploySchema.model_validate({"applications": config.get("applications", [])})
    # private: Ray has no public in-process deploy-from-config
    client = context._get_global_client()
    if client is None:
        raise RuntimeError("Serve is not running: call local_ray.start() first")
    client.deploy_apps(schema)
    names = {app.name for app in schema.applications}
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = {n: a for n, a in serve.status().applications.items() if n in names}
        failed = [f"{n}: {a.message}" for n, a in statuses.items() if a.status == "DEPLOY_FAILED"]
        if failed:
            raise RuntimeError("Serve could not deploy " + "; ".join(failed))
        if len(statuses) == len(names) and all(a.status == "RUNNING" for a in statuses.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Serve applications {sorted(names)} not running after {timeout_s} s"
            )
        time.sleep(0.5)


def absolute_paths(args: dict[str, Any], base: Path) -> dict[str, Any]:
    args = {**args}
    for section, key in (("student", "path"), ("teacher", "path"), ("log", "dir")):
        value = args.get(section, {}).get(key)
        if value is not None and not Path(value).is_absolute():
            args[section] = {**args[section], key: str((base / value).resolve())}
    registry = args.get("registry")
    if registry and not is_remote(registry) and not Path(registry).is_absolute():
        args["registry"] = str((base / registry).resolve())
    ship_to = args.get("log", {}).get("ship_to")
    if ship_to and not is_remote(ship_to) and not Path(ship_to).is_absolute():
        args["log"] = {**args["log"], "ship_to": str((base / ship_to).resolve())}
    return args


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
