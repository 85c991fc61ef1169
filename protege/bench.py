"""``protege bench``: what serving costs against what the models themselves cost, on the
student the learning loop produced, side by side in one run.

Rows, in order: each model in process (the limit: no HTTP, the replicas' thread count,
batch 1 and 32); the learned student on plain uvicorn; then per ingress (the Python proxy,
HAProxy) on Ray Serve: the student alone (1 and 32 inputs a request), the cascade at the
version's default target and at the threshold that keeps its accuracy within a point of
the teacher's, the teacher served alone (its own application: no student, no log), and
the seed student's cascade as a reference. Every served row is also a share of its
in-process limit. Writes ``bench.json`` and ``bench.md`` and prints the table.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.evaluate import predict_all
from distill.optimize import rate
from protege import bbc
from protege.bench_inprocess import InProcess, measure, threshold_near_teacher
from protege.bench_report import markdown, served_row, summary
from protege.default_models import build_defaults
from protege.gateway_process import (
    load_serve_config,
    running_gateway,
    wait_for_version,
    with_student,
)
from protege.traffic import send
from serving import local_ray
from serving.access import steering_key
from serving.classify.classifier import Classifier
from serving.client import ProtegeClient
from serving.contracts.defaults import SCORER
from serving.contracts.manifest import read_manifest
from serving.contracts.registry import Registry

BENCH_PORT, PLAIN_PORT, METRICS_PORT = 8200, 8300, 8281
TEACHER_ALONE = "/teacher-alone"


def default_registry(cache: Path) -> Path:
    """The demo's registry when ``make demo`` has run (it holds learned students), else
    the cache's (the seed alone)."""
    demo = Path("var/demo/registry")
    return demo if (demo / "current.json").exists() else cache / "registry"


def run_bench(
    cache: Path,
    config_path: Path,
    requests: int,
    concurrency: int,
    out: Path,
    ingress: str,
    registry_path: Path | None = None,
) -> dict[str, Any]:
    build_defaults(cache)
    registry = Registry(registry_path or default_registry(cache))
    current, seed = registry.current(), _seed_version(cache)
    if current is None:
        raise SystemExit(f"error: registry {registry.uri} has no current version")
    runtime = registry.manifest(current).runtime
    learned = current not in (seed, f"{seed}-{runtime}")  # the seed, or it on another runtime
    _announce(current, seed, learned, registry.uri)
    pool = bbc.read_split(cache / "data", "holdout") + bbc.read_split(cache / "data", "stream")
    random.Random(0).shuffle(pool)
    bench, select = pool[:requests], pool[requests : requests + 600]
    texts, gold = [e.text for e in bench], [e.label for e in bench]

    torch.set_num_threads(1)  # as each replica gets (Ray sets one thread per fractional CPU)
    key, keys_file = steering_key(out.resolve())  # rows with routing overrides use it
    config = _config(config_path, cache, registry, out, keys_file)
    scorer = config["applications"][0]["args"].get("cascade", {}).get("scorer", SCORER)
    limits, point = _in_process(registry.path(current), cache, texts, select, scorer)
    rows = [_in_process_row(m, gold, b) for m in limits.values() for b in sorted(m.rates)]
    rows += _torch_rows(registry.path(current), cache, texts, gold, limits)
    rows.append(_plain_uvicorn(registry.path(current), texts, gold, concurrency, limits))
    modes: list[local_ray.Ingress] = ["proxy", "haproxy"] if ingress == "both" else [ingress]  # type: ignore[list-item]
    for mode in modes:
        began = time.perf_counter()
        with running_gateway(
            config, port=BENCH_PORT, metrics_port=METRICS_PORT, ingress=mode
        ) as url:
            plan = _Plan(url, key, texts, gold, concurrency, f"Serve, {mode}", limits)
            rows += plan.run(point.threshold, seed if learned else None, config)
        print(f"{mode}: stack up, measured and shut down in {time.perf_counter() - began:.0f} s")
    report = {
        "student": {"version": current, "seed": seed, "learned": learned},
        "registry": registry.uri,
        "requests": requests,
        "concurrency": concurrency,
        "threads_per_replica": 1,
        "near_teacher": point.__dict__,
        "rows": rows,
        "summary": summary(rows),
        "machine": {"cpus": os.cpu_count()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(report))
    print("\n" + markdown(report))
    return report


def _seed_version(cache: Path) -> str:
    manifest = read_manifest(cache / "models" / "student")
    if manifest is None:
        raise SystemExit(f"error: {cache / 'models' / 'student'} has no protege.json")
    return manifest.version


def _announce(current: str, seed: str, learned: bool, where: str) -> None:
    if learned:
        print(f"measuring the learned student {current} from {where} (seed {seed} as reference)")
        return
    bar = "!" * 78
    print(
        f"{bar}\n!! only the seed student {seed} is in {where}: every row measures the SEED."
        f"\n!! Run `make demo` (or `protege distill`) first to measure a learned student.\n{bar}"
    )


def _in_process(
    student_folder: Path,
    cache: Path,
    texts: list[str],
    select: list[bbc.Example],
    scorer: str,
) -> tuple[dict[str, InProcess], Any]:
    """Both models' limits on the bench texts, and the near-teacher threshold chosen on a
    disjoint labelled slice (``select``), so the served accuracy is not fitted to itself."""
    student = Classifier(student_folder)
    teacher = Classifier(cache / "models" / "teacher")
    limits = {
        "student": measure("student", student, texts),
        "teacher": measure("teacher", teacher, texts),
    }
    chosen = [e.text for e in select]
    gold = np.array([student.labels.index(e.label) for e in select])
    point = threshold_near_teacher(
        predict_all(student, chosen), predict_all(teacher, chosen), gold, scorer
    )
    print(
        f"near-teacher threshold {point.threshold:.4f}: cascade accuracy {point.accuracy:.1%} "
        f"vs teacher {point.teacher_accuracy:.1%}, escalating {point.escalation_rate:.1%} "
        f"(on {len(select)} labelled inputs not in the bench)"
    )
    return limits, point


def _in_process_row(model: InProcess, gold: list[str], batch: int) -> dict[str, Any]:
    labels = np.array(bbc.LABELS)[model.probs.argmax(1)]
    return {
        "scenario": f"{model.name} on {model.runtime}, in process, batch {batch}",
        "stack": "in process",
        "model": model.version,
        "inputs_per_request": batch,
        "inputs_per_s": model.rates[batch],
        "accuracy": round(float(np.mean(labels == np.array(gold))), 4),
    }


def _torch_rows(
    student: Path, cache: Path, texts: list[str], gold: list[str], limits: dict[str, InProcess]
) -> list[dict[str, Any]]:
    """The same weights on eager PyTorch, for a model served through ONNX Runtime: what
    the runtime buys, in process."""
    rows = []
    for name, folder in (("student", student), ("teacher", cache / "models" / "teacher")):
        if limits[name].runtime == "torch":
            continue
        model = Classifier(folder, runtime="torch")
        for batch in (1, 32):
            row = _in_process_row(limits[name], gold, batch)  # the same answers (to 1e-5)
            rows.append(
                row
                | {
                    "scenario": f"{name} on torch (not served), in process, batch {batch}",
                    "inputs_per_s": round(rate(model, texts, batch, 10.0), 1),
                }
            )
    return rows


def _config(
    path: Path, cache: Path, registry: Registry, out: Path, keys_file: Path
) -> dict[str, Any]:
    """The cascade following ``registry``, and beside it the teacher served alone: the
    same gateway with the teacher in the student's place, never escalating, logging
    nothing (so it pays for one model and one hop, as teacher-only serving would)."""
    config = load_serve_config(
        path,
        cache,
        registry=registry.uri,
        cascade={"audit_fraction": 0.0},
        log={"dir": str(out / "escalations")},
        access={"keys_file": str(keys_file)},
    )
    cascade = config["applications"][0]
    alone = copy.deepcopy(cascade)
    alone |= {"name": "teacher-alone", "route_prefix": TEACHER_ALONE}
    args = alone["args"]
    args["student"] = {**args["student"], "path": str(cache / "models" / "teacher")}
    args["registry"] = None
    args["cascade"] = {**args["cascade"], "threshold": 0.0}  # confidence >= 0: never escalates
    args["log"] = {**args["log"], "dir": str(out / "teacher-alone-log")}
    config["applications"] = [cascade, alone]
    return config


class _Plan:
    """The served rows on one running stack."""

    def __init__(
        self,
        url: str,
        key: str,
        texts: list[str],
        gold: list[str],
        concurrency: int,
        stack: str,
        limits: dict[str, InProcess],
    ) -> None:
        self.url, self.key, self.texts, self.gold = url, key, texts, gold
        self.concurrency, self.stack, self.limits = concurrency, stack, limits

    def run(
        self, near_teacher: float, seed: str | None, config: dict[str, Any]
    ) -> list[dict[str, Any]]:
        with ProtegeClient(self.url + TEACHER_ALONE) as client:
            client.wait_ready(300)
        rows = [
            self._row("student-only", force_tier="student"),
            self._row("student-only, 32 inputs/request", force_tier="student", batch=32),
            self._row("cascade, default target", limit_model="cascade"),
            self._row(
                "cascade, within 1 pt of teacher", threshold=near_teacher, limit_model="cascade"
            ),
            self._row("teacher alone", url=self.url + TEACHER_ALONE, limit_model="teacher"),
        ]
        if seed is not None:  # pin the seed in place (a user_config update), then measure
            local_ray.deploy_config(with_student(config, seed), Path.cwd())
            with ProtegeClient(self.url, api_key=self.key) as client:
                wait_for_version(client, seed)
            rows.append(self._row("cascade, seed student (reference)", limit_model="cascade"))
        return rows

    def _row(
        self,
        name: str,
        *,
        url: str | None = None,
        batch: int = 1,
        limit_model: str = "student",
        **routing: Any,
    ) -> dict[str, Any]:
        url = url or self.url
        batches = _BatchSizes(METRICS_PORT)
        send(
            url,
            self.texts[: self.concurrency * 2],
            concurrency=self.concurrency,
            api_key=self.key,
            **routing,
        )
        before = batches.read()
        run = send(
            url, self.texts, concurrency=self.concurrency, batch=batch, api_key=self.key, **routing
        )
        mean_batch = batches.mean_since(before)
        return served_row(
            f"{name} ({self.stack})", self.stack, run, self.gold, batch, self.limits, limit_model
        ) | {"mean_batch": mean_batch}


class _BatchSizes:
    """Mean forward-pass batch size per model over a row, from the replicas' own
    ``protege_batch_size`` histogram on the metrics agent (exported every few seconds)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://{local_ray.LOOPBACK}:{port}/metrics"

    def read(self) -> dict[str, tuple[float, float]]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        time.sleep(6)  # let the agent export what the last requests recorded
        totals: dict[str, list[float]] = {}
        text = httpx.get(self.url, timeout=10).text
        for family in text_string_to_metric_families(text):
            if family.name != "ray_protege_batch_size":
                continue
            for sample in family.samples:
                key = f"{sample.labels.get('application')}/{sample.labels.get('model')}"
                if sample.name.endswith("_sum"):
                    totals.setdefault(key, [0.0, 0.0])[0] += sample.value
                elif sample.name.endswith("_count"):
                    totals.setdefault(key, [0.0, 0.0])[1] += sample.value
        return {k: (v[0], v[1]) for k, v in totals.items()}

    def mean_since(self, before: dict[str, tuple[float, float]]) -> dict[str, dict[str, float]]:
        after = self.read()
        means = {}
        for key, (total, count) in after.items():
            t0, c0 = before.get(key, (0.0, 0.0))
            if count > c0:
                means[key] = {"mean": round((total - t0) / (count - c0), 1), "batches": count - c0}
        return means


def _plain_uvicorn(
    folder: Path, texts: list[str], gold: list[str], concurrency: int, limits: dict[str, InProcess]
) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # Ray gives each replica one thread too
    command = [sys.executable, "-m", "protege.plain_student", "--model", str(folder)]
    server = subprocess.Popen([*command, "--port", str(PLAIN_PORT)], env=env)
    try:
        url = f"http://127.0.0.1:{PLAIN_PORT}"
        with ProtegeClient(url) as client:
            client.wait_ready(120)
        send(url, texts[: concurrency * 2], concurrency=concurrency)
        run = send(url, texts, concurrency=concurrency)
        return served_row(
            "student-only (plain uvicorn, no Ray)", "uvicorn", run, gold, 1, limits, "student"
        )
    finally:
        server.terminate()
        server.wait(30)
