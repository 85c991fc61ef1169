"""Poll for a condition in tests; never a fixed sleep before an assertion."""

import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], object], timeout_s: float = 30.0, every_s: float = 0.1
) -> object:
    """Poll until ``condition()`` is truthy; fail with a clear message otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(every_s)
