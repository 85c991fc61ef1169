"""``protege bench-loop``: the learning loop's costs, side by side in one run.

- distillation throughput (training samples/s) with 1 worker (a plain process) and with
  2 Ray Train workers, on the default student and the same examples;
- request latency p50/p99 during hot swaps against steady state, on the same gateway
  under the same concurrent load.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill.finetune import TrainSettings, fine_tune
from protege import bbc
from protege.bbc import sample
from protege.default_models import build_defaults
from protege.gateway_process import load_serve_config, running_gateway, with_student
from serving import local_ray
from serving.access import steering_key
from serving.classify import meanpool
from serving.client import ProtegeClient
from serving.contracts.manifest import read_manifest, weights_digest, write_manifest
from serving.contracts.registry import Registry

PORT = 8210


def _training_throughput(cache: Path, examples: int, workers: int) -> dict[str, Any]:
    meanpool.register()
    folder = cache / "models" / "student"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = sample(bbc.read_split(cache / "data", "stream_sentences"), examples, seed=9)
    texts, labels = [e.text for e in data], [bbc.LABELS.index(e.label) for e in data]
    soft = [[0.9 if i == y else 0.025 for i in range(5)] for y in labels]
    settings = TrainSettings(epochs=1, batch_size=16)
    began = time.perf_counter()
    if workers > 1:
        from distill.ray_train import train_with_ray

        train_with_ray(model, tokenizer, texts, labels, soft, settings, workers)
    else:
        fine_tune(model, tokenizer, texts, labels, settings, torch.device("cpu"), soft_targets=soft)
    seconds = time.perf_counter() - began
    return {
        "workers": workers,
        "examples": examples,
        "seconds": round(seconds, 1),
        "samples_per_s": round(examples / seconds, 1),
    }


def _perturbed_copy(registry: Registry, version: str) -> str:
    """A second, distinct version of the same student (its head nudged), to swap to."""
    source = registry.path(version)
    staging = registry.root / "staging" / "bench-copy"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    weights = load_file(str(staging / "model.safetensors"))
    weights["classifier.bias"] = weights["classifier.bias"] + 1e-3
    save_file(weights, str(staging / "model.safetensors"), metadata={"format": "pt"})
    manifest = read_manifest(source)
    assert manifest is not None
    copy = f"student-{weights_digest(staging)}"
    write_manifest(staging, manifest.model_copy(update={"version": copy, "parent": version}))
    if registry.exists(copy):
        shutil.rmtree(staging)
        return copy
    return registry.publish(staging)


def _load(
    url: str, key: str, seconds: float, texts: list[str], clients: int = 8
) -> tuple[list[float], int]:
    latencies: list[float] = []
    failures = [0]
    stop = time.monotonic() + seconds

    def worker(offset: int) -> None:
        with ProtegeClient(url, api_key=key, timeout=30, retries=0) as client:
            i = offset
            while time.monotonic() < stop:
                began = time.perf_counter()
                try:
                    client.classify(texts[i % len(texts)], force_tier="student")
                    latencies.append(time.perf_counter() - began)
                except Exception:
                    failures[0] += 1
                i += clients

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures[0]


def _latency_row(
    name: str, latencies: list[float], failures: int, seconds: float
) -> dict[str, Any]:
    return {
        "phase": name,
        "requests": len(latencies),
        "failed": failures,
        "req_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 1),
    }


def _swap_latency(
    cache: Path, config_path: Path, out: Path, seconds: float
) -> list[dict[str, Any]]:
    registry = Registry(out / "registry")
    shutil.rmtree(registry.root, ignore_errors=True)
    seed = registry.import_folder(cache / "models" / "student")
    registry.promote(seed)
    other = _perturbed_copy(registry, seed)
    key, keys_file = steering_key(out.resolve())  # the load forces the student tier
    config = load_serve_config(
        config_path,
        cache,
        registry=str(registry.root),
        log={"dir": str(out / "escalations")},
        cascade={"audit_fraction": 0.0},
        access={"keys_file": str(keys_file)},
    )
    texts = [e.text for e in bbc.read_split(cache / "data", "holdout")]
    with running_gateway(config, port=PORT) as url:
        steady = _load(url, key, seconds, texts)
        swaps: list[float] = []

        def swapper() -> None:
            versions = [other, seed]
            deadline = time.monotonic() + seconds
            with ProtegeClient(url, api_key=key) as client:
                while time.monotonic() < deadline - 4:
                    target = versions[len(swaps) % 2]
                    began = time.perf_counter()
                    local_ray.deploy_config(with_student(config, target), Path.cwd())
                    while client.model().protege.student.version != target:
                        time.sleep(0.05)
                    swaps.append(time.perf_counter() - began)

        thread = threading.Thread(target=swapper)
        thread.start()
        swapping = _load(url, key, seconds, texts)
        thread.join()
    rows = [
        _latency_row("steady state", *steady, seconds),
        _latency_row("during hot swaps", *swapping, seconds),
    ]
    rows[1]["swaps"] = len(swaps)
    rows[1]["swap_seconds_p50"] = round(float(np.median(swaps)), 2) if swaps else None
    return rows


def run_bench_loop(
    cache: Path, config_path: Path, out: Path, examples: int, seconds: float
) -> dict[str, Any]:
    build_defaults(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    training = [_training_throughput(cache, examples, w) for w in (1, 2)]
    import ray

    ray.shutdown()  # Ray Train's local Ray; the gateway starts its own on loopback
    swap = _swap_latency(cache, config_path, out, seconds)
    report = {"training": training, "swap_latency": swap, "machine": {"cpus": os.cpu_count()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_loop.json").write_text(json.dumps(report, indent=1))
    text = _markdown(training, swap)
    (out / "bench_loop.md").write_text(text)
    print("\n" + text)
    return report


def _markdown(training: list[dict[str, Any]], swap: list[dict[str, Any]]) -> str:
    lines = ["| distillation | examples | seconds | samples/s |", "|---|---|---|---|"]
    for r in training:
        name = (
            "1 worker (plain process)" if r["workers"] == 1 else f"{r['workers']} Ray Train workers"
        )
        lines.append(f"| {name} | {r['examples']} | {r['seconds']} | {r['samples_per_s']} |")
    lines += [
        "",
        "| serving, 8 clients | requests | failed | req/s | p50 ms | p99 ms | max ms | swaps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in swap:
        lines.append(
            f"| {r['phase']} | {r['requests']} | {r['failed']} | {r['req_per_s']} | {r['p50_ms']} "
            f"| {r['p99_ms']} | {r['max_ms']} | {r.get('swaps', '-')} |"
        )
    return "\n".join(lines) + "\n"
