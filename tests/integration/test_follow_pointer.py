"""Every gateway replica follows the registry's current pointer, with no helper process:
two replicas converge on a promoted version under load with no failed request; a pin in
user_config holds a version against the pointer; unpinned, they follow it again."""

import time

import pytest
from conftest import app_config, steering, tiny_config, wait_for
from ray import serve
from test_hot_swap import Load, add_version

from serving import local_ray
from serving.client import ProtegeClient
from serving.contracts.registry import Registry

pytestmark = pytest.mark.integration
POLL_S = 0.5


def all_answers_are(load: Load, version: str, since: float, count: int = 40) -> bool | None:
    """The last ``count`` answers after ``since`` all came from ``version``: with two
    replicas picked at random, both have answered among them (odds 2 in 2^40 otherwise)."""
    recent = [v for t, v in load.versions if t > since][-count:]
    return (len(recent) == count and set(recent) == {version}) or None


def test_replicas_follow_the_pointer_and_a_pin_holds_against_it(serve_cluster, tiny_pair, tmp_path):
    registry = Registry(tmp_path / "registry")
    first = add_version(registry, tmp_path, seed=31, name="first")
    second = add_version(registry, tmp_path, seed=32, name="second")
    registry.promote(first)
    args = tiny_config(tiny_pair, tmp_path / "log", registry=str(registry.root))
    args["registry_poll_s"] = POLL_S
    config = app_config("follow", args, {})
    config["applications"][0]["deployments"][0]["num_replicas"] = 2
    local_ray.deploy_config(config, tmp_path)
    url = f"http://127.0.0.1:{serve_cluster}/follow"
    client = ProtegeClient(url, api_key=steering()[0], timeout=60)
    client.wait_ready(120)
    with Load(url) as load:
        wait_for(lambda: all_answers_are(load, first, 0.0), timeout_s=120)
        promoted_at = time.monotonic()
        registry.promote(second)  # no deploy, no helper: the replicas read the pointer
        wait_for(lambda: all_answers_are(load, second, promoted_at), timeout_s=120)
        converged = min(t for t, v in load.versions if t > promoted_at and v == second)
        print(
            f"\nfirst answer from the promoted version {converged - promoted_at:.1f} s after "
            f"the pointer moved (poll {POLL_S} s)"
        )

        # a held rollback: pinned to the first version, whatever the pointer says
        pinned = app_config("follow", args, {"student_version": first})
        pinned["applications"][0]["deployments"][0]["num_replicas"] = 2
        local_ray.deploy_config(pinned, tmp_path)
        pinned_at = time.monotonic()
        wait_for(lambda: all_answers_are(load, first, pinned_at), timeout_s=120)
        assert registry.current() == second
        swap = client.model().protege.swap
        assert swap.following == f"pinned to {first}" and swap.pointer == second

        local_ray.deploy_config(config, tmp_path)  # user_config {}: follow the pointer again
        unpinned_at = time.monotonic()
        wait_for(lambda: all_answers_are(load, second, unpinned_at), timeout_s=120)
    assert load.failures == []
    serve.delete("follow")
