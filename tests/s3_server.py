"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1.

moto keeps its objects in memory, so it is paused (SIGSTOP) to take the store away, never
killed mid-test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
from polling import wait_for

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "protege-test",
    "AWS_SECRET_ACCESS_KEY": "protege-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self) -> None:
        binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        if not Path(binary).exists():
            raise RuntimeError("moto_server is missing: `make install` installs moto[server]")
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._up, timeout_s=60, every_s=0.2)

    def _up(self) -> bool:
        try:
            return httpx.get(self.endpoint, timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    def environment(self) -> dict[str, str]:
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def new_bucket(self) -> str:
        """A fresh bucket; returns its name."""
        from serving.contracts.storage import ObjectStore

        name = f"protege-{uuid.uuid4().hex[:12]}"
        ObjectStore(f"s3://{name}", self.endpoint).fs.mkdir(name)
        return name

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        self.process.wait(10)
