"""``protege soak``: find the gateway's saturation throughput, then hold 70 % of it.

1. Ramp: closed-loop clients at rising concurrency, ``step_s`` each; the saturation
   throughput is the best request rate seen (the ramp stops once more clients stop helping).
2. Hold: an open-loop load at ``hold_fraction`` of that rate for ``hold_s``. Requests are
   sent on schedule whether or not earlier ones have returned, and latency counts from the
   scheduled time, so a stall shows up in the percentiles instead of slowing the load.
3. Memory: the resident set of every Ray process (raylet, GCS, controller, proxy, replicas)
   at the start and the end of the hold, and its growth.

It writes soak.json and soak.md and prints the tables. A benchmark, not a test: nothing
here asserts a time.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from protege.gateway_process import load_serve_config, running_gateway

MAX_OUTSTANDING = 512  # open-loop requests in flight before the client itself falls behind


@dataclass
class Window:
    """What one load phase saw."""

    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    behind: int = 0  # open loop: sends skipped because MAX_OUTSTANDING were in flight

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def row(self, name: str, **extra: Any) -> dict[str, Any]:
        lat = np.array(self.latencies_s or [float("nan")]) * 1000
        return {
            "phase": name,
            **extra,
            "requests": len(self.latencies_s) + sum(self.errors.values()),
            "errors": sum(self.errors.values()),
            "error_kinds": self.errors,
            "throughput_rps": round(len(self.latencies_s) / self.seconds, 1) if self.seconds else 0,
            "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "max_ms": round(float(lat.max()), 1),
            "client_behind": self.behind,
        }


async def _one(http: httpx.AsyncClient, text: str, since: float, window: Window) -> None:
    try:
        response = await http.post("/v1/classify", json={"inputs": [text]})
    except httpx.HTTPError as exc:
        window.error(type(exc).__name__)
        return
    if response.status_code == 200:
        window.latencies_s.append(time.perf_counter() - since)
    else:
        window.error(str(response.status_code))


async def closed_loop(url: str, texts: list[str], clients: int, seconds: float) -> Window:
    window, stop = Window(), time.perf_counter() + seconds
    async with _client(url, clients) as http:

        async def worker(offset: int) -> None:
            i = offset
            while time.perf_counter() < stop:
                await _one(http, texts[i % len(texts)], time.perf_counter(), window)
                i += clients

        began = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        window.seconds = time.perf_counter() - began
    return window


async def open_loop(
    url: str, texts: list[str], rate: float, seconds: float, on_tick: Any = None
) -> Window:
    window, pending = Window(), set[asyncio.Task[None]]()
    async with _client(url, MAX_OUTSTANDING) as http:
        began = time.perf_counter()
        sent = 0
        while (now := time.perf_counter()) < began + seconds:
            due = began + sent / rate
            if due > now:
                await asyncio.sleep(due - now)
            if len(pending) >= MAX_OUTSTANDING:
                window.behind += 1
            else:
                task = asyncio.create_task(_one(http, texts[sent % len(texts)], due, window))
                pending.add(task)
                task.add_done_callback(pending.discard)
            sent += 1
            if on_tick is not None and sent % max(1, int(rate * 30)) == 0:
                on_tick(time.perf_counter() - began)
        await asyncio.gather(*pending)
        window.seconds = time.perf_counter() - began
    return window


def _client(url: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=url, timeout=60, limits=limits)


def ray_processes() -> dict[str, int]:
    """RSS in bytes of every Ray process on this machine, keyed by a readable name."""
    found: dict[str, int] = {}
    for process in psutil.process_iter(["name", "cmdline", "memory_info"]):
        cmdline = process.info["cmdline"] or []
        name = _ray_name(process.info["name"] or "", cmdline)
        if name is None or process.info["memory_info"] is None:
            continue
        key = name if name not in found else f"{name} (pid {process.pid})"
        found[key] = process.info["memory_info"].rss
    return found


def _ray_name(name: str, cmdline: list[str]) -> str | None:
    first = cmdline[0] if cmdline else ""
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]  # the title names the task running: drop it
    if name in ("raylet", "gcs_server") or first.endswith(("/raylet", "/gcs_server")):
        return name or Path(first).name
    joined = " ".join(cmdline)
    for marker, label in (
        ("dashboard/agent.py", "dashboard agent"),
        ("runtime_env/agent", "runtime-env agent"),
        ("_private/log_monitor.py", "log monitor"),
        ("dashboard/dashboard.py", "dashboard"),
        ("default_worker.py", "idle worker"),
    ):
        if marker in joined:
            return label
    return None


def memory_rows(start: dict[str, int], end: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(set(start) | set(end)):
        before, after = start.get(name), end.get(name)
        growth = (after - before) / before if before and after else None
        rows.append(
            {
                "process": name,
                "rss_start_mb": round(before / 2**20, 1) if before else None,
                "rss_end_mb": round(after / 2**20, 1) if after else None,
                "growth": None if growth is None else round(growth, 4),
            }
        )
    total_start, total_end = sum(start.values()), sum(end.values())
    rows.append(
        {
            "process": "all Ray processes",
            "rss_start_mb": round(total_start / 2**20, 1),
            "rss_end_mb": round(total_end / 2**20, 1),
            "growth": round((total_end - total_start) / total_start, 4) if total_start else None,
        }
    )
    return rows


def ramp(url: str, texts: list[str], steps: list[int], step_s: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for clients in steps:
        window = asyncio.run(closed_loop(url, texts, clients, step_s))
        rows.append(window.row(f"ramp, {clients} clients", clients=clients))
        print(_line(rows[-1]), flush=True)
        best = max(r["throughput_rps"] for r in rows[:-1]) if len(rows) > 1 else 0
        if len(rows) > 2 and rows[-1]["throughput_rps"] < 1.05 * best:
            break  # more clients no longer help: saturated
    return rows


def run_soak(
    config_path: Path,
    cache: Path | None,
    texts: list[str],
    out: Path,
    *,
    steps: list[int],
    step_s: float,
    hold_s: float,
    hold_fraction: float,
    port: int,
    metrics_port: int,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    config = load_serve_config(config_path, cache, log={"dir": str(out.resolve() / "escalations")})
    with running_gateway(config, port=port, metrics_port=metrics_port) as url:
        asyncio.run(closed_loop(url, texts, 4, 5))  # warm up
        ramp_rows = ramp(url, texts, steps, step_s)
        saturation = max(r["throughput_rps"] for r in ramp_rows)
        rate = hold_fraction * saturation
        print(
            f"saturation {saturation} req/s; holding {rate:.1f} req/s for {hold_s:.0f} s",
            flush=True,
        )
        samples = [{"t_s": 0.0, "rss_mb": _total_mb()}]
        start = ray_processes()
        window = asyncio.run(
            open_loop(
                url,
                texts,
                rate,
                hold_s,
                lambda t: samples.append({"t_s": round(t), "rss_mb": _total_mb()}),
            )
        )
        end = ray_processes()
    hold = window.row(f"hold at {hold_fraction:.0%} of saturation", target_rps=round(rate, 1))
    report = {
        "saturation_rps": saturation,
        "ramp": ramp_rows,
        "hold": hold,
        "memory": memory_rows(start, end),
        "rss_samples": samples,
        "settings": {"steps": steps, "step_s": step_s, "hold_s": hold_s, "fraction": hold_fraction},
    }
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    (out / "soak.md").write_text(markdown(report))
    print("\n" + markdown(report))
    return report


def _total_mb() -> float:
    return round(sum(ray_processes().values()) / 2**20, 1)


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['phase']}: {row['throughput_rps']} req/s, p50 {row['p50_ms']} ms, "
        f"p99 {row['p99_ms']} ms, errors {row['errors']}"
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| phase | req/s | p50 ms | p95 ms | p99 ms | max ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in [*report["ramp"], report["hold"]]:
        lines.append(
            f"| {row['phase']} | {row['throughput_rps']} | {row['p50_ms']} | {row['p95_ms']} | "
            f"{row['p99_ms']} | {row['max_ms']} | {row['errors']} |"
        )
    lines += ["", "| Ray process | RSS start MB | RSS end MB | growth |", "|---|---|---|---|"]
    for row in report["memory"]:
        growth = "" if row["growth"] is None else f"{row['growth']:+.1%}"
        lines.append(
            f"| {row['process']} | {row['rss_start_mb']} | {row['rss_end_mb']} | {growth} |"
        )
    return "\n".join(lines) + "\n"
