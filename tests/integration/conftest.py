"""One real local Ray Serve per test session, on 127.0.0.1, with tiny random models."""

import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from polling import wait_for  # noqa: F401 - re-exported for the integration tests

from serving.access import steering_key
from serving.client import ProtegeClient

SUPPORT = Path(__file__).resolve().parent.parent / "support"  # test-only replica code
sys.path.insert(0, str(SUPPORT))
_STEERING: tuple[str, Path] | None = None


def steering() -> tuple[str, Path]:
    """The session's API key (allowed the routing overrides) and the key file that holds it:
    every test gateway requires a key, so authentication is on in every integration test."""
    global _STEERING
    if _STEERING is None:
        _STEERING = steering_key(Path(tempfile.mkdtemp(prefix="protege-keys-")))
    return _STEERING


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {steering()[0]}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Ray's metrics export port for the session (Prometheus tests scrape it)."""
    return free_port()


@pytest.fixture(scope="session")
def serve_cluster(metrics_port) -> Iterator[int]:
    from serving import local_ray

    # replicas import test-only helpers (tests/support) through PYTHONPATH
    support = str(Path(__file__).resolve().parent.parent / "support")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (support, os.environ.get("PYTHONPATH")) if p
    )

    port = free_port()
    # logical CPUs: several small apps share this 2-core machine during the session
    local_ray.start(http_port=port, metrics_port=metrics_port, num_cpus=16)
    yield port
    local_ray.stop()


@pytest.fixture(scope="module")
def deploy(serve_cluster) -> Iterator[Callable[[str, dict], ProtegeClient]]:
    """Deploy the gateway under ``/<name>`` and return a client; deleted after the module."""
    from ray import serve

    from serving.app import build_app

    names: list[str] = []

    def _deploy(name: str, config: dict) -> ProtegeClient:
        serve.run(build_app(config), name=name, route_prefix=f"/{name}")
        names.append(name)
        url = f"http://127.0.0.1:{serve_cluster}/{name}"
        client = ProtegeClient(url, api_key=steering()[0], timeout=60)
        client.wait_ready(120)
        return client

    yield _deploy
    for name in names:
        serve.delete(name)


def tiny_config(tiny_pair: tuple[Path, Path], log_dir: Path, **overrides) -> dict:
    student, teacher = tiny_pair
    config = {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "cascade": {"threshold": 0.5},
        "log": {"dir": str(log_dir), "fsync_interval_s": 0.2},
        "limits": {"max_inputs": 8, "max_chars": 300},
        "torch_threads": 1,
        "access": {"keys_file": str(steering()[1])},
    }
    config.update(overrides)
    return config


def app_config(name: str, args: dict, user_config: dict) -> dict:
    """A Serve config of one gateway app under ``/<name>``, deployed through the config
    path (``local_ray.deploy_config``) so that a later ``user_config`` applies in place."""
    return {
        "applications": [
            {
                "name": name,
                "route_prefix": f"/{name}",
                "import_path": "serving.app:build_app",
                "args": args,
                "deployments": [{"name": "Gateway", "user_config": user_config}],
            }
        ]
    }


_DEPLOYED: list[str] = []  # apps from deploy_with_teacher, deleted after their module


@pytest.fixture(autouse=True, scope="module")
def _delete_apps_after_module() -> Iterator[None]:
    """Apps a module deployed with deploy_with_teacher go when it ends: idle apps left in the
    session's Ray still cost CPU and metric series for every later test."""
    yield
    if _DEPLOYED:
        from ray import serve

        for name in _DEPLOYED:
            serve.delete(name)
        _DEPLOYED.clear()


def deploy_with_teacher(
    serve_cluster: int, name: str, args: dict, teacher, **gateway_options
) -> ProtegeClient:
    """Deploy a gateway under ``/<name>`` in front of ``teacher`` (a bound deployment, such
    as a misbehaving one from tests/support), with Serve options for the Gateway."""
    from ray import serve

    from serving.app import load_config
    from serving.gateway import Gateway

    config = load_config(args)
    app = Gateway.options(**gateway_options).bind(config, teacher)
    serve.run(app, name=name, route_prefix=f"/{name}")
    _DEPLOYED.append(name)
    client = ProtegeClient(
        f"http://127.0.0.1:{serve_cluster}/{name}", api_key=steering()[0], timeout=60
    )
    client.wait_ready(120)
    return client
