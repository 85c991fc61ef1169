"""The folders show the architecture, and the imports keep to it.

- ``serving/contracts/`` is what serving and distillation share: no Ray Serve, no web
  framework, no request path, no kind.
- ``distill/`` imports the contracts and the kinds' model and scorer modules, never Ray
  Serve nor the request path.
- The request path's shared modules know no kind.

Each check imports the modules in a fresh interpreter and reads ``sys.modules``, so an
import hidden two modules away counts too.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_EVERYWHERE = ("ray.serve", "fastapi", "starlette", "uvicorn")
REQUEST_PATH = (
    "serving.gateway",
    "serving.http_api",
    "serving.guard",
    "serving.app",
    "serving.hot_swap",
    "serving.follow",
    "serving.log_sink",
    "serving.batcher",
    "serving.classify.service",
    "serving.classify.teacher",
    "serving.classify.decision",
    "serving.generate.service",
    "serving.generate.teacher",
    "serving.generate.host",
    "serving.generate.openai_api",
    "serving.generate.openai_errors",
    "serving.classify.host",
)
KIND_FREE = (
    "serving.guard",
    "serving.access",
    "serving.batcher",
    "serving.follow",
    "serving.log_sink",
    "serving.metrics",
    "serving.hot_swap",
)


def modules(package: str) -> list[str]:
    folder = ROOT / package.replace(".", "/")
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(folder)]) if not m.ispkg]


def loaded_after_importing(names: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_contracts_are_free_of_serve_the_request_path_and_the_kinds():
    loaded = loaded_after_importing(modules("serving.contracts"))
    bad = [m for m in loaded if m.startswith(FORBIDDEN_EVERYWHERE + REQUEST_PATH)]
    bad += [m for m in loaded if m.startswith(("serving.classify", "serving.generate"))]
    assert not bad, f"serving/contracts imports {bad}"


def test_distill_never_reaches_into_serve_or_the_request_path():
    loaded = loaded_after_importing(modules("distill"))
    bad = [m for m in loaded if m.startswith(FORBIDDEN_EVERYWHERE + REQUEST_PATH)]
    assert not bad, f"distill imports {bad}"


@pytest.mark.parametrize("module", KIND_FREE)
def test_the_shared_request_path_knows_no_kind(module):
    loaded = loaded_after_importing([module])
    kinds = [m for m in loaded if m.startswith(("serving.classify", "serving.generate"))]
    assert not kinds, f"{module} imports {kinds}"
