"""Run the gateway from deploy/serve_config.yaml on a local Ray bound to 127.0.0.1."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from serving import local_ray
from serving.client import ProtegeClient

DEFAULT_CONFIG = Path("deploy/serve_config.yaml")


def load_serve_config(
    path: Path, cache: Path | None = None, **arg_overrides: Any
) -> dict[str, Any]:
    """The YAML, with the model paths pointed at ``cache`` and ``args`` sections overridden."""
    if not path.exists():
        raise FileNotFoundError(f"serve config {path} not found")
    config = yaml.safe_load(path.read_text())
    for app in config.get("applications", []):
        args = app.setdefault("args", {})
        if cache is not None:
            args["student"] = {**args.get("student", {}), "path": str(cache / "models" / "student")}
            args["teacher"] = {**args.get("teacher", {}), "path": str(cache / "models" / "teacher")}
        for key, value in arg_overrides.items():
            args[key] = {**args.get(key, {}), **value} if isinstance(value, dict) else value
    return config


@contextmanager
def running_gateway(
    config: dict[str, Any],
    *,
    port: int = local_ray.DEFAULT_HTTP_PORT,
    metrics_port: int = local_ray.DEFAULT_METRICS_PORT,
    ingress: local_ray.Ingress = "proxy",
) -> Iterator[str]:
    """Start Ray and Serve, deploy ``config``, yield the base URL, shut down on exit."""
    local_ray.start(http_port=port, metrics_port=metrics_port, ingress=ingress)
    try:
        local_ray.deploy_config(copy.deepcopy(config), Path.cwd())
        prefix = config["applications"][0].get("route_prefix", "/").rstrip("/")
        url = f"http://{local_ray.LOOPBACK}:{port}{prefix}"
        with ProtegeClient(url) as client:
            client.wait_ready(300)
        yield url
    finally:
        local_ray.stop()


def with_student(config: dict[str, Any], version: str) -> dict[str, Any]:
    """The same Serve config with the Gateway's ``user_config`` naming ``version``: deployed,
    only that changes, so Serve reconfigures the live replicas in place (no restart)."""
    updated = copy.deepcopy(config)
    for app in updated["applications"]:
        deployments = app.setdefault("deployments", [])
        gateway = next((d for d in deployments if d.get("name") == "Gateway"), None)
        if gateway is None:
            gateway = {"name": "Gateway"}
            deployments.append(gateway)
        gateway["user_config"] = {"student_version": version}
    return updated


def wait_for_version(client: ProtegeClient, version: str, timeout_s: float = 300) -> None:
    """Until the gateway's student is ``version`` (a swap has landed)."""
    deadline = time.monotonic() + timeout_s
    while client.model().protege.student.version != version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not swap to {version} in {timeout_s} s")
        time.sleep(0.5)
