"""Shipping finished log segments to shared storage (a folder, and a real S3 server): each
segment becomes one object, never rewritten; a live writer's segment is never taken; a
crashed writer's segments are shipped by the next one; an outage loses nothing."""

import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import pytest

from serving.contracts.log_shipping import SegmentShipper, fetch_shipped
from serving.contracts.records import EscalationLogWriter, iter_records, list_segments
from serving.contracts.storage import LocalStore, ObjectStore, open_store
from tests.unit.test_escalation_log import record

ROOT = Path(__file__).resolve().parents[2]


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        self.counts[name] += value

    def set(self, name: str, value: float, **tags: str) -> None:
        self.gauges[name] = value


@pytest.fixture(params=["folder", "s3"])
def store(request, tmp_path):
    if request.param == "folder":
        return LocalStore(tmp_path / "shared")
    return open_store(request.getfixturevalue("s3_uri"))


def shipped_ids(store, tmp_path) -> list[str]:
    local = fetch_shipped(store, tmp_path / "fetched")
    return sorted(r.record_id for r in iter_records(local))


def test_finished_segments_ship_and_the_open_one_stays(store, tmp_path):
    writer = EscalationLogWriter(tmp_path / "log", writer_id="r1", max_segment_bytes=500)
    metrics = Metrics()
    shipper = SegmentShipper(
        tmp_path / "log", store, ship_every_s=3600, writer=lambda: writer, metrics=metrics
    )
    for i in range(6):
        writer.append([record(i)])
    finished = [s for s in list_segments(tmp_path / "log") if s != writer.current_segment]
    assert len(finished) >= 2
    assert shipper.ship_once() == len(finished)  # the rotated-out segments
    assert list_segments(tmp_path / "log") == [writer.current_segment]
    kept = sum(1 for _ in iter_records(tmp_path / "log"))
    assert shipped_ids(store, tmp_path) == [f"rec{i}" for i in range(6 - kept)]
    assert metrics.counts["protege_log_segments_shipped"] == len(finished)
    assert metrics.gauges["protege_log_unshipped_bytes"] == writer.current_segment.stat().st_size
    writer.close()


def test_an_old_open_segment_is_finished_and_shipped(store, tmp_path):
    writer = EscalationLogWriter(tmp_path / "log", writer_id="r1")
    shipper = SegmentShipper(tmp_path / "log", store, ship_every_s=0.0, writer=lambda: writer)
    assert shipper.ship_once() == 0  # nothing written: nothing to finish
    writer.append([record(1), record(2)])
    assert shipper.ship_once() == 1
    writer.append([record(3)])  # into the segment opened by the rotation
    assert shipper.ship_once() == 1
    assert shipped_ids(store, tmp_path) == ["rec1", "rec2", "rec3"]
    writer.close()


def test_another_writers_open_segment_is_never_taken(store, tmp_path):
    other = EscalationLogWriter(tmp_path / "log", writer_id="other")  # a live replica
    other.append([record(1)])
    shipper = SegmentShipper(tmp_path / "log", store, ship_every_s=3600)
    assert shipper.ship_once() == 0 and other.current_segment.exists()
    other.close()  # finished (and unlocked): any shipper on the node may ship it
    assert shipper.ship_once() == 1 and shipped_ids(store, tmp_path) == ["rec1"]


def test_segments_of_a_killed_writer_are_shipped_by_the_next_one(store, tmp_path):
    log = tmp_path / "log"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                sys.path.insert(0, {str(ROOT)!r})
                from serving.contracts.records import EscalationLogWriter
                from tests.unit.test_escalation_log import record
                writer = EscalationLogWriter({str(log)!r}, writer_id="dead")
                writer.append([record(i) for i in range(5)])
                print("written", flush=True)
                time.sleep(600)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "written"
    shipper = SegmentShipper(log, store, ship_every_s=3600)
    assert shipper.ship_once() == 0  # its writer is alive: its segment is not finished
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    restarted = EscalationLogWriter(log, writer_id="dead")  # the replica comes back
    shipper = SegmentShipper(log, store, ship_every_s=3600, writer=lambda: restarted)
    assert shipper.ship_once() == 1
    assert shipped_ids(store, tmp_path) == [f"rec{i}" for i in range(5)]
    restarted.close()


def test_two_shippers_racing_ship_each_segment_once(store, tmp_path):
    writer = EscalationLogWriter(tmp_path / "log", writer_id="r1", max_segment_bytes=800)
    for i in range(20):
        writer.append([record(i)])
    writer.close()
    segments = len(list_segments(tmp_path / "log"))
    shippers = [SegmentShipper(tmp_path / "log", store, ship_every_s=3600) for _ in range(3)]
    threads = [threading.Thread(target=s.ship_once) for s in shippers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(s.shipped for s in shippers) == segments
    assert list_segments(tmp_path / "log") == []
    assert shipped_ids(store, tmp_path) == sorted(f"rec{i}" for i in range(20))


def test_an_object_is_never_rewritten(store, tmp_path):
    writer = EscalationLogWriter(tmp_path / "log", writer_id="r1")
    writer.append([record(1)])
    writer.close()
    (segment,) = list_segments(tmp_path / "log")
    store.create(segment.name, b"something else\n")  # a name taken with other content
    shipper = SegmentShipper(tmp_path / "log", store, ship_every_s=3600)
    with pytest.raises(RuntimeError, match="exists with other content"):
        shipper.ship_once()
    assert segment.exists() and store.read(segment.name) == b"something else\n"


def test_an_outage_is_counted_retried_with_backoff_and_loses_nothing(s3_uri, tmp_path):
    writer = EscalationLogWriter(tmp_path / "log", writer_id="r1")
    metrics = Metrics()
    bucket = s3_uri.removeprefix("s3://")
    down = ObjectStore(f"s3://{bucket}", "http://127.0.0.1:9")  # nothing listens there
    shipper = SegmentShipper(
        tmp_path / "log", down, ship_every_s=0.0, writer=lambda: writer, metrics=metrics
    )
    stop = threading.Event()
    thread = threading.Thread(target=shipper.run, args=(stop,))
    thread.start()
    for i in range(10):
        writer.append([record(i)])
    from polling import wait_for

    wait_for(lambda: metrics.counts["protege_log_ship_errors"] >= 2, timeout_s=60)
    assert shipper.shipped == 0 and len(list_segments(tmp_path / "log")) >= 1
    shipper.store = open_store(s3_uri)  # the store is back
    wait_for(lambda: shipper.shipped >= 1 and shipper.unshipped_bytes() == 0, timeout_s=60)
    stop.set()
    thread.join(30)
    writer.close()
    assert shipped_ids(shipper.store, tmp_path) == [f"rec{i}" for i in range(10)]


def test_a_segment_that_fails_to_ship_does_not_hold_up_the_others(tmp_path):
    writer = EscalationLogWriter(tmp_path / "log", writer_id="r1", max_segment_bytes=500)
    for i in range(6):
        writer.append([record(i)])
    writer.close()
    segments = list_segments(tmp_path / "log")
    store = LocalStore(tmp_path / "shared")
    real_create = store.create
    bad = segments[0].name

    def create(key, data):
        if key == bad:
            raise OSError("this one object cannot be written")
        return real_create(key, data)

    store.create = create  # type: ignore[method-assign]
    shipper = SegmentShipper(tmp_path / "log", store, ship_every_s=3600)
    with pytest.raises(OSError, match="cannot be written"):
        shipper.ship_once()
    assert shipper.shipped == len(segments) - 1
    assert list_segments(tmp_path / "log") == [segments[0]]  # kept for the next pass
    store.create = real_create  # type: ignore[method-assign]
    assert shipper.ship_once() == 1 and list_segments(tmp_path / "log") == []
