"""The loop across machines: a two-node Ray cluster on 127.0.0.1 whose nodes share nothing
but an S3-compatible store (a real moto server).

Node A runs the teacher and half of the training; node B runs both gateway replicas and
the other half. Each node has its own Ray temp folder and its own local folders (models,
log segments, downloaded versions); the registry and the shipped log live only in the
store. The test serves traffic while the store is paused for a few seconds, counts the
records that reach the store, runs the distillation job with two Ray Train workers on the
two nodes, and watches both gateway replicas move to the promoted version with no failed
request.

Ray's multi-node mode on one machine is ``ray.cluster_utils.Cluster`` (one raylet, object
store and temp folder per node). ``ray start --node-ip-address 127.0.0.1`` cannot be used
here: in cluster mode Ray replaces a loopback node address with the machine's external one,
and in its single-machine mode (which keeps everything on 127.0.0.1) a second ``ray start``
refuses to join.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from polling import wait_for

from distill.config import DistillConfig
from protege import bbc
from serving.access import steering_key
from serving.client import ProtegeClient
from serving.contracts.log_shipping import fetch_shipped
from serving.contracts.records import iter_records, list_segments
from serving.contracts.registry import Registry
from serving.contracts.storage import open_store

pytestmark = [pytest.mark.slow, pytest.mark.multinode]
PAUSE_S = 15.0  # longer than a shipping request may take (10 s): shipping fails, retries
SHIP_EVERY_S = 2.0


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, s3_server):
    """Two Ray nodes on 127.0.0.1 with their own temp folders, and Serve on node A."""
    from serving.local_ray import QUIET_ENV, pin_loopback

    root = tmp_path_factory.mktemp("nodes")
    pin_loopback({**QUIET_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    os.environ.update(QUIET_ENV)  # inherited by both nodes' raylets and workers
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "resources": {"node_a": 100},
            "include_dashboard": False,
            "temp_dir": str(root / "a" / "ray"),
        },
    )
    metrics_b = _free_port()  # node B's metrics agent: where the gateway replicas' metrics are
    cluster.add_node(
        num_cpus=4,
        resources={"node_b": 100},
        temp_dir=str(root / "b" / "ray"),
        metrics_export_port=metrics_b,
    )
    ray.init(address=cluster.address, log_to_driver=False)
    port = _free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"},
        logging_config={"enable_access_log": False},
    )
    yield root, port, metrics_b
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Traffic:
    """Clients sending batches of stream headlines until stopped; every answer is kept."""

    def __init__(self, url: str, key: str, texts: list[str], clients: int = 4) -> None:
        self.url, self.key, self.texts = url, key, texts
        self.stop = threading.Event()
        self.answers: list[tuple[float, str, list]] = []  # (time, request id, outputs)
        self.failures: list[str] = []
        self.sent = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _next(self) -> list[str]:
        with self._lock:
            start = self.sent * 8 % len(self.texts)
            self.sent += 1
            return self.texts[start : start + 8] or self.texts[:8]

    def _run(self) -> None:
        with ProtegeClient(self.url, api_key=self.key, timeout=60, retries=0) as client:
            while not self.stop.is_set():
                request_id = uuid.uuid4().hex
                try:
                    reply = client.classify(self._next(), request_id=request_id)
                    self.answers.append((time.time(), request_id, reply.outputs))
                    if reply.logged is False:
                        self.failures.append(f"{request_id}: records not logged")
                except Exception as exc:
                    self.failures.append(repr(exc))

    def versions_since(self, since: float) -> list[str]:
        """The student versions that answered after ``since`` (Unix seconds)."""
        return [
            o.model_version
            for t, _, outs in self.answers
            if t > since
            for o in outs
            if o.tier == "student"
        ]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


def _node_folders(root: Path, lite_cache: Path) -> tuple[Path, Path]:
    """Each node's own disk: node A the teacher and the job's data, node B the seed student."""
    a, b = root / "a", root / "b"
    shutil.copytree(lite_cache / "models" / "teacher", a / "models" / "teacher")
    shutil.copytree(lite_cache / "data", a / "data")
    shutil.copytree(lite_cache / "models" / "student", b / "models" / "student")
    return a, b


def _serve_config(a: Path, b: Path, uri: str, keys: Path) -> dict:
    args = {
        "student": {"path": str(b / "models" / "student")},
        "teacher": {"path": str(a / "models" / "teacher")},
        "registry": f"{uri}/registry",
        "registry_cache_dir": str(b / "registry-cache"),
        "registry_poll_s": 1.0,
        # most confident inputs are sampled for the job's gate (as tests/integration/
        # test_distill_job.py writes its log)
        "cascade": {"audit_fraction": 0.8},
        "log": {
            "dir": str(b / "escalations"),
            "ship_to": f"{uri}/escalations",
            "ship_every_s": SHIP_EVERY_S,
            "fsync_interval_s": 0.2,
        },
        "limits": {"max_inputs": 8, "max_chars": 4000},
        "access": {"keys_file": str(keys)},
        "torch_threads": 1,
    }
    on = lambda node: {"num_cpus": 0.5, "resources": {node: 1}}  # noqa: E731
    return {
        "applications": [
            {
                "name": "cluster",
                "route_prefix": "/cluster",
                "import_path": "serving.app:build_app",
                "args": args,
                "deployments": [
                    {"name": "Gateway", "num_replicas": 2, "ray_actor_options": on("node_b")},
                    {"name": "Teacher", "num_replicas": 1, "ray_actor_options": on("node_a")},
                ],
            }
        ]
    }


def _job_config(a: Path, uri: str) -> DistillConfig:
    return DistillConfig.model_validate(
        {
            "registry": f"{uri}/registry",
            "log_dir": f"{uri}/escalations",
            "teacher": a / "models" / "teacher",
            "traffic": a / "data" / "traffic.jsonl",
            "gold": a / "data" / "gold.jsonl",
            "work_dir": a / "distill-work",
            "min_records": 50,
            "device": "cpu",
            "train": {
                "epochs": 3,
                "batch_size": 16,
                "lr_encoder": 1e-4,
                "lr_head": 2e-3,
                "workers": 2,
                "placement_strategy": "STRICT_SPREAD",  # one worker on each node
            },
            "replay": {"earlier_records": 50},
            "eval": {"share": 0.5, "min_calibration_sampled": 30},
            # a permissive gate: this test is about the machinery across nodes; the gate is
            # tested as a statistic in tests/unit/test_gate.py and judged on the lite pair in
            # tests/integration/test_distill_job.py. On ~130 sampled records a candidate a
            # point or two better is not shown better at 95 % (one run: +1.6 points, bound
            # -5.0), so here any candidate whose drop is more likely positive than not passes
            "gate": {
                "target_agreement": 0.95,
                "min_sampled": 30,
                "confidence": 0.55,
                "min_drop": 0.0,
                "min_relative_drop": 0.0,
                "agreement_margin": 1.0,
                "gold_margin": 1.0,
            },
        }
    )


def _unshipped(folder: Path) -> int:
    return sum(p.stat().st_size for p in list_segments(folder)) if folder.is_dir() else 0


def test_two_nodes_share_only_the_object_store(nodes, lite_cache, s3_server):
    from serving import local_ray

    root, port, metrics_b = nodes
    a, b = _node_folders(root, lite_cache)
    uri = f"s3://{s3_server.new_bucket()}/protege"
    registry = Registry(f"{uri}/registry", cache_dir=a / "registry-cache")
    seed = registry.import_folder(lite_cache / "models" / "student")
    registry.promote(seed, expected=None)
    key, keys = steering_key(root / "keys")
    local_ray.deploy_config(_serve_config(a, b, uri, keys), root)
    url = f"http://127.0.0.1:{port}/cluster"
    ProtegeClient(url, api_key=key, timeout=60).wait_ready(300)
    texts = [e.text for e in bbc.read_split(a / "data", "stream_sentences")][:1600]

    # 1. traffic, with the store taken away for a few seconds in the middle
    with Traffic(url, key, texts) as traffic:
        wait_for(lambda: traffic.sent >= 60, timeout_s=600, every_s=0.5)
        s3_server.pause()
        paused_at = time.time()
        time.sleep(PAUSE_S)
        s3_server.resume()
        answered_in_pause = sum(1 for t, _, _ in traffic.answers if t > paused_at)
        wait_for(lambda: traffic.sent >= 200, timeout_s=600, every_s=0.5)
    assert traffic.failures == []
    assert answered_in_pause > 0  # serving went on while the store was away
    resumed_at = time.monotonic()
    wait_for(lambda: _unshipped(b / "escalations") == 0, timeout_s=180, every_s=0.5)
    caught_up = time.monotonic() - resumed_at

    # 2. every record reached the store once: each escalated output of every answer, and
    # the sampled confident ones, under server-made ids that never repeat
    shipped = fetch_shipped(open_store(f"{uri}/escalations"), a / "fetched-log")
    records = list(iter_records(shipped))
    assert len({r.record_id for r in records}) == len(records)
    by_request = Counter(r.request_id for r in records if r.reason != "audit")
    audits = Counter(r.request_id for r in records if r.reason == "audit")
    for _, request_id, outputs in traffic.answers:
        assert by_request.pop(request_id, 0) == sum(o.escalated for o in outputs)
        assert audits.pop(request_id, 0) <= sum(not o.escalated for o in outputs)
    assert by_request == Counter() and audits == Counter()  # none from nowhere

    # 3. the job on both nodes, reading the log from the store, while traffic goes on;
    # 4. both gateway replicas move to the promoted version, with no failed request
    with Traffic(url, key, texts[:64], clients=2) as load:
        report = _run_job(_job_config(a, uri))
        assert report["result"] == "promoted", report.get("reason")
        promoted = report["candidate"]
        promoted_at = json.loads(open_store(f"{uri}/registry").read("current.json") or b"")[
            "updated_at"
        ]

        def converged() -> bool:
            recent = load.versions_since(promoted_at)[-80:]  # both replicas, odds 2 in 2^80
            return len(recent) == 80 and set(recent) == {promoted}

        wait_for(converged, timeout_s=300, every_s=0.5)
        first = min(t for t, _, outs in load.answers if outs[0].model_version == promoted)
    assert load.failures == []
    assert report["train_nodes"] == 2  # one Ray Train worker on each node
    assert registry.current() == promoted
    assert (b / "registry-cache" / promoted / "_complete.json").exists()  # checked download

    # 5. a version whose files were changed in the store is refused; the old one serves on
    tampered = _tampered_copy(registry, promoted, a)
    registry.promote(tampered, expected=promoted)
    with Traffic(url, key, texts[:64], clients=2) as load:
        since = time.time()
        wait_for(lambda: _metric(metrics_b, "ray_protege_versions_refused_total") >= 1, 120)
        refused_at = time.time()  # then 40 more answers, over several more polls
        wait_for(lambda: len(load.versions_since(refused_at)) >= 40, timeout_s=120)
        assert set(load.versions_since(since)) == {promoted}
    assert load.failures == []
    assert _metric(metrics_b, "ray_protege_log_ship_errors_total") >= 1  # during the pause
    print(
        "\n"
        + json.dumps(
            {
                "requests": len(traffic.answers),
                "records_in_store": len(records),
                "answered_while_store_paused": answered_in_pause,
                "shipping_caught_up_s": round(caught_up, 1),
                "job_seconds": report["seconds"],
                "first_promoted_answer_s": round(first - promoted_at, 1),
                "requests_during_job": len(load.answers),
            }
        )
    )


def _tampered_copy(registry: Registry, version: str, scratch: Path) -> str:
    """Publish a copy of ``version`` under another id, then change its weights in the store."""
    from serving.contracts.manifest import read_manifest, write_manifest

    staged = scratch / "tampered"
    shutil.copytree(registry.path(version), staged)
    manifest = read_manifest(staged)
    assert manifest is not None
    copy = f"{version}-tampered"
    write_manifest(staged, manifest.model_copy(update={"version": copy}))
    registry.publish(staged)
    registry.store.write(f"versions/{copy}/model.safetensors", b"not the published weights")
    return copy


def _metric(port: int, name: str) -> float:
    """The sum of a metric's series on a node's metrics agent (0 while it has none)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def _run_job(config: DistillConfig) -> dict:
    from distill.job import run

    return run(config)
