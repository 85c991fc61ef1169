"""Ray and Serve listen on 127.0.0.1 only, with one exception Ray does not let us change.

Ray Serve 2.60 starts each replica's inter-deployment gRPC server on ``[::]:0``
(ray/serve/_private/replica.py, hard-coded, no setting). Everything else, the HTTP proxy,
GCS, raylet, agents and workers, is pinned to loopback by serving.local_ray.
"""

import ipaddress
import os

import psutil
import pytest

pytestmark = pytest.mark.integration


def ray_processes() -> set[int]:
    root = psutil.Process(os.getpid())
    pids = {p.pid for p in root.children(recursive=True)}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ray" in cmdline and ("/ray/" in cmdline or cmdline.startswith("ray::")):
            pids.add(proc.info["pid"])
    return pids


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


def test_every_ray_listener_is_on_loopback(serve_cluster, deploy, tiny_pair, tmp_path):
    from conftest import tiny_config

    deploy("loopback", tiny_config(tiny_pair, tmp_path))
    pids = ray_processes()
    listeners = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert any(c.laddr.port == serve_cluster for c in listeners)  # the HTTP proxy is among them
    exposed = [
        (c.laddr.ip, psutil.Process(c.pid).name()) for c in listeners if not is_loopback(c.laddr.ip)
    ]
    known_exception = [
        (ip, name) for ip, name in exposed if ip == "::" and name.startswith("ray::ServeReplica")
    ]
    assert exposed == known_exception
    assert len(known_exception) <= len(
        [p for p in pids if psutil.Process(p).name().startswith("ray::ServeReplica")]
    )
