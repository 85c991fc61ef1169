import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the session; the AWS variables point every client at it."""
    from s3_server import S3Server

    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.environment()}
    os.environ.update(server.environment())
    yield server
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_uri(s3_server) -> str:
    """A fresh, empty bucket prefix on the session's S3 server."""
    return f"s3://{s3_server.new_bucket()}/protege"


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny mean-pooled student and a tiny plain BERT teacher, same labels."""
    from tiny_models import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    student = build_tiny(root / "student", seed=1, mean_pool=True)
    teacher = build_tiny(root / "teacher", seed=2, mean_pool=False)
    return student, teacher


@pytest.fixture(scope="session")
def lite_cache(tmp_path_factory) -> Path:
    """The default-model build on the lite profile: real MiniLM weights and BBC data."""
    from protege.default_models import build_defaults

    cache = tmp_path_factory.mktemp("cache")
    build_defaults(cache, "lite", device="cpu")
    return cache
