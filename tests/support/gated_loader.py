"""A student loader the tests can hold open: it waits while ``<registry>/gates/<version>``
exists, then loads like the real one. Replicas import it through PYTHONPATH."""

import time
from pathlib import Path

from serving.classify.student import load_student


def load(folder, cascade, device, max_tokens, labels):
    gate = Path(folder).parent.parent / "gates" / Path(folder).name
    deadline = time.monotonic() + 120
    while gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return load_student(folder, cascade, device, max_tokens, labels)
