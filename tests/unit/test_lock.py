"""The run lease: one distillation run at a time, across machines sharing the registry."""

import json
import multiprocessing
import os
import time

import pytest
from polling import wait_for

from distill.lock import Lease, LockedError, run_lock
from serving.storage import LocalStore


def test_second_run_is_refused_while_the_first_holds_the_lease(tmp_path):
    lock = tmp_path / "distill.lock"
    store = LocalStore(tmp_path)
    with run_lock(store) as lease:
        held = json.loads(lock.read_text())
        assert held["owner"] == lease.owner and held["pid"] == os.getpid()
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"), run_lock(store):
            pass
    assert lock.read_text() == ""  # released: free


def test_a_lease_left_by_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    lock = tmp_path / "distill.lock"
    store = LocalStore(tmp_path)
    stale = {"owner": "x", "host": "here", "pid": 999999999, "expires_at": time.time() + 600}
    lock.write_text(json.dumps(stale))
    with run_lock(store, host="here") as lease:
        assert json.loads(lock.read_text())["owner"] == lease.owner


def test_a_live_lease_of_another_machine_is_respected_until_it_expires(tmp_path):
    lock = tmp_path / "distill.lock"
    store = LocalStore(tmp_path)
    other = {"owner": "y", "host": "node-b", "pid": 999999999, "expires_at": time.time() - 59.5}
    # expired half a second ago: still held for one more TTL (60 s) of grace for clock skew
    lock.write_text(json.dumps(other))  # its pid means nothing here: only the expiry counts
    with pytest.raises(LockedError, match="on node-b"), run_lock(store, host="node-a"):
        pass
    # the other machine stopped renewing: once its lease runs out, it is taken over
    lease = Lease(store, host="node-a")

    def taken() -> bool | None:
        try:
            lease.acquire()
        except LockedError:
            return None
        return True

    wait_for(taken, timeout_s=10)
    assert json.loads(lock.read_text())["owner"] == lease.owner
    lease.release()


def test_a_held_lease_is_renewed_so_it_never_runs_out(tmp_path):
    store = LocalStore(tmp_path)
    with run_lock(store, ttl_s=0.3, host="node-a") as lease:
        deadline = time.monotonic() + 1.5  # five lease lengths
        while time.monotonic() < deadline:
            with pytest.raises(LockedError), run_lock(store, ttl_s=0.3, host="node-b"):
                pass
            time.sleep(0.05)
        assert not lease.lost.is_set() and lease.renew()


def test_a_lease_taken_over_is_known_to_be_lost(tmp_path):
    lock = tmp_path / "distill.lock"
    store = LocalStore(tmp_path)
    lease = Lease(store, ttl_s=600, host="node-a")
    lease.acquire()
    lock.write_text(json.dumps({"owner": "z", "host": "node-b", "pid": 1, "expires_at": 0}))
    assert lease.renew() is False and lease.lost.is_set()
    lease.release()
    assert json.loads(lock.read_text())["owner"] == "z"  # never removes another's lease


def _contend(lock: str, host: str, start: float, results) -> None:
    while time.time() < start:
        time.sleep(0.001)
    try:
        with run_lock(LocalStore(lock), host=host):
            results.put(host)
            time.sleep(1.0)  # the run
    except LockedError:
        results.put("refused")


def test_two_runs_started_at_once_on_different_machines_exactly_one_runs(tmp_path):
    results: multiprocessing.Queue = multiprocessing.Queue()
    start = time.time() + 0.5
    runs = [
        multiprocessing.Process(target=_contend, args=(str(tmp_path / "l"), h, start, results))
        for h in ("node-a", "node-b", "node-c", "node-d")
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in runs)
    assert outcomes.count("refused") == 3 and len(set(outcomes) - {"refused"}) == 1


class FailingStore(LocalStore):
    """A store that stops answering after the lease is taken (errors of any type)."""

    failing = False

    def update(self, key, change):
        if self.failing:
            raise RuntimeError("EndpointConnectionError: could not connect")  # not an OSError
        return super().update(key, change)


def test_a_store_that_fails_while_renewing_ends_in_a_lost_lease_not_a_dead_thread(tmp_path):
    store = FailingStore(tmp_path)
    lease = Lease(store, ttl_s=0.3, host="node-a")
    lease.acquire()
    store.failing = True
    wait_for(lease.lost.is_set, timeout_s=10)  # once the lease ran out unrenewed
    lease.release()  # the store still fails: logged, never raised (the lease runs out anyway)
    store.failing = False
    lease2 = Lease(store, ttl_s=0.3, host="node-b")
    wait_for(lambda: _try(lease2), timeout_s=10)  # taken over after expiry and grace
    lease2.release()


def _try(lease: Lease) -> bool:
    try:
        lease.acquire()
    except LockedError:
        return False
    return True
