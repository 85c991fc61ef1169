"""The run lease: one distillation run at a time, across machines sharing the registry."""

import json
import multiprocessing
import os
import threading
import time
from types import SimpleNamespace

import pytest
from polling import wait_for
from test_registry import staged_version

from distill.dataset import Window, read_watermark, write_watermark
from distill.lock import LEASE_KEY, Lease, LockedError, run_lock
from serving.contracts.registry import Registry
from serving.contracts.storage import LocalStore, StorageError, Store, open_store


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


TTL = 2.0


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path) -> Store:
    """The registry's store: a folder, or a prefix on the session's real S3 server (moto)."""
    if request.param == "folder":
        return LocalStore(tmp_path / "reg")
    return open_store(request.getfixturevalue("s3_uri"))


class Partition(Store):
    """One run's way to ``store``, cut while ``down`` is set (every call raises, as in a
    network partition, and is counted in ``refused``); other runs reach the store itself."""

    def __init__(self, store: Store) -> None:
        self.store, self.uri, self.down = store, store.uri, threading.Event()
        self.refused = 0

    def _reach(self) -> Store:
        if self.down.is_set():
            self.refused += 1
            raise StorageError(f"object store {self.uri} did not answer within 30 s")
        return self.store

    def read(self, key):
        return self._reach().read(key)

    def write(self, key, data):
        self._reach().write(key, data)

    def update(self, key, change):
        return self._reach().update(key, change)


class Clock:
    """The Unix time every lease of a test reads, moved by the test alone: expiries and
    takeovers follow it, so how late a loaded machine runs a thread never decides a test
    (renewals and their retries still run on their real timers)."""

    def __init__(self) -> None:
        self.now = 1_000_000_000.0  # whole and half seconds from here add exactly

    def __call__(self) -> float:
        return self.now


def _holder(store: Store) -> dict:
    return json.loads(store.read(LEASE_KEY) or b"{}")


def _cut_after_a_renewal(partition: Partition, clock: Clock) -> float:
    """Start the outage just after the lease was renewed; returns when it started (the
    lease then expires one TTL later, however late the renewal thread ran)."""
    clock.now += 1.0  # less than a TTL: nothing expires
    wait_for(lambda: _holder(partition.store)["expires_at"] == clock.now + TTL, every_s=0.02)
    partition.down.set()
    return clock.now


def _outage(partition: Partition) -> None:
    """Let the run's renewal thread meet the outage: it fails, and tries again."""
    refused = partition.refused
    wait_for(lambda: partition.refused >= refused + 2, timeout_s=10, every_s=0.02)


def test_an_outage_of_one_and_a_half_ttl_leaves_the_lease_with_its_run(store):
    cut, clock = Partition(store), Clock()
    first = Lease(cut, ttl_s=TTL, host="node-a", clock=clock)
    first.acquire()
    began = _cut_after_a_renewal(cut, clock)
    other = Lease(store, ttl_s=TTL, host="node-b", clock=clock)
    for step in range(16):  # another run tries all along the outage, which lasts 1.5 TTL
        clock.now = began + step * 1.5 * TTL / 15
        assert not _try(other), clock.now - began
        if step in (0, 15):  # the renewal thread fails at the start and at the end of it
            _outage(cut)
    assert clock.now == began + 1.5 * TTL
    cut.down.clear()
    wait_for(lambda: _holder(store)["expires_at"] == clock.now + TTL, timeout_s=10)  # renewed
    assert not _try(other)
    assert first.renew() and not first.lost.is_set()
    assert _holder(store)["owner"] == first.owner
    first.release()


def test_an_outage_of_three_ttl_loses_the_lease_and_the_watermark_never_moves_back(store, tmp_path):
    from distill.job import decision_result

    registry = Registry(store.uri, cache_dir=tmp_path / "cache")
    for v in ("seed", "candidate"):
        registry.publish(staged_version(tmp_path, v))
    registry.promote("seed")
    assert write_watermark(store, {"segment-1": 100}, read={})
    cut, clock = Partition(store), Clock()
    first = Lease(cut, ttl_s=TTL, host="node-a", clock=clock)
    first.acquire()
    read = read_watermark(store)  # the first run's window: 100 up to 120
    window = Window(new=[], replay=[], watermark={"segment-1": 120}, read=read)
    began = _cut_after_a_renewal(cut, clock)
    second = Lease(store, ttl_s=TTL, host="node-b", clock=clock)
    clock.now = began + 2 * TTL  # expired a TTL ago: the grace is not over
    _outage(cut)
    assert not _try(second)
    clock.now = began + 2 * TTL + 0.5
    assert _try(second)  # taken over once expiry and grace passed
    assert write_watermark(store, {"segment-1": 150}, read_watermark(store))  # it consumes
    clock.now = began + 3 * TTL  # the outage lasts 3 TTL
    _outage(cut)
    cut.down.clear()
    wait_for(first.lost.is_set, timeout_s=10)  # renewal kept trying, and found the new owner
    assert first.renew() is False  # what the run asks just before it publishes
    accepted = SimpleNamespace(promote=True, reason="better")
    result, _ = decision_result(registry, accepted, "candidate", "seed", first, window)
    assert result == "lease-lost" and registry.current() == "seed"
    assert read_watermark(store) == {"segment-1": 150}  # not moved back to 120
    assert not write_watermark(store, window.watermark, window.read)  # a stale base: refused
    assert read_watermark(store) == {"segment-1": 150}
    first.release()  # never frees the other run's lease
    assert _holder(store)["owner"] == second.owner
    second.release()


def _try(lease: Lease) -> bool:
    try:
        lease.acquire()
    except LockedError:
        return False
    return True
