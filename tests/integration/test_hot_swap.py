"""Hot swap on a real local Ray Serve, under concurrent load, through Serve's in-place
``user_config`` update (the config-deploy path): no failed request, the old version
answers while the new one loads, the new one answers after, a broken one is refused."""

import shutil
import threading
import time

import pytest
from conftest import app_config, steering, tiny_config, wait_for
from ray import serve
from tiny_models import build_tiny

from serving import local_ray
from serving.client import ProtegeClient
from serving.contracts.manifest import ModelManifest, weights_digest, write_manifest
from serving.contracts.registry import Registry

pytestmark = pytest.mark.integration
LABELS = ["business", "entertainment", "politics", "sport", "tech"]


def add_version(registry: Registry, tmp_path, seed: int, name: str) -> str:
    staged = build_tiny(tmp_path / f"staged-{name}", seed=seed, mean_pool=True)
    version = f"student-{weights_digest(staged)}"
    write_manifest(
        staged,
        ModelManifest(version=version, role="student", created_at=time.time(), labels=LABELS),
    )
    return registry.publish(staged)


class Load:
    """Clients sending requests without pause until stopped; records every answer."""

    def __init__(self, url: str, clients: int = 4) -> None:
        self.url, self.stop, self.failures = url, threading.Event(), []
        self.versions: list[tuple[float, str]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with ProtegeClient(self.url, api_key=steering()[0], timeout=30, retries=0) as client:
            while not self.stop.is_set():
                try:
                    out = client.classify("Striker scores twice in cup final", force_tier="student")
                    self.versions.append((time.monotonic(), out.outputs[0].model_version))
                except Exception as exc:
                    self.failures.append(repr(exc))

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_hot_swap_under_load(serve_cluster, tiny_pair, tmp_path):
    registry = Registry(tmp_path / "registry")
    old = add_version(registry, tmp_path, seed=11, name="old")
    new = add_version(registry, tmp_path, seed=12, name="new")
    broken = add_version(registry, tmp_path, seed=13, name="broken")
    (registry.path(broken) / "model.safetensors").write_bytes(b"not a safetensors file")
    registry.promote(old)
    args = tiny_config(tiny_pair, tmp_path / "log", registry=str(registry.root))
    args["student_loader"] = "gated_loader:load"
    local_ray.deploy_config(app_config("swap", args, {}), tmp_path)
    url = f"http://127.0.0.1:{serve_cluster}/swap"
    client = ProtegeClient(url, api_key=steering()[0], timeout=60)
    client.wait_ready(120)
    assert client.model().protege.student.version == old

    gates = registry.root / "gates"
    gates.mkdir()
    (gates / new).touch()  # hold the new version's load open
    with Load(url) as load:
        wait_for(lambda: len(load.versions) > 20)
        local_ray.deploy_config(app_config("swap", args, {"student_version": new}), tmp_path)
        wait_for(lambda: client.model().protege.swap.loading == new)
        held_from = time.monotonic()
        wait_for(lambda: sum(t > held_from for t, _ in load.versions) > 30)  # served while loading
        assert client.model().protege.student.version == old
        released_at = time.monotonic()
        (gates / new).unlink()  # release the load
        wait_for(lambda: client.model().protege.student.version == new, timeout_s=60)
        swapped_at = time.monotonic()
        wait_for(lambda: sum(t > swapped_at for t, _ in load.versions) > 20)

        # a broken version is refused and the current one keeps serving
        local_ray.deploy_config(app_config("swap", args, {"student_version": broken}), tmp_path)
        wait_for(lambda: client.model().protege.swap.failures >= 1, timeout_s=60)
        refused_at = time.monotonic()
        wait_for(lambda: sum(t > refused_at for t, _ in load.versions) > 20)
    models = client.model().protege
    assert models.student.version == new and broken in (models.swap.last_error or "")
    assert load.failures == []
    answered_while_loading = [v for t, v in load.versions if held_from < t < released_at]
    assert answered_while_loading and set(answered_while_loading) == {old}
    assert {v for t, v in load.versions if t > swapped_at + 0.5} == {new}
    assert models.swap.swaps == 1

    # a user_config that changes only the threshold applies in place, with no load
    local_ray.deploy_config(
        app_config("swap", args, {"student_version": new, "threshold": 0.3}), tmp_path
    )
    wait_for(lambda: client.model().protege.threshold == 0.3, timeout_s=60)
    models = client.model().protege
    assert models.student.version == new and models.swap.swaps == 1
    assert "fixed threshold 0.3" in models.threshold_rule
    assert not any(str(tmp_path) in str(v) for v in models.model_dump().values())  # no paths
    serve.delete("swap")
    shutil.rmtree(gates)
