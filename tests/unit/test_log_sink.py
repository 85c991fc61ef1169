"""The replica's log sink: a full disk or an unusable folder never fails a request; the
errors are counted, the sink says the records were not written, and it tries again."""

import asyncio
import os
from collections import Counter

from serving import log_sink
from serving.config import LogConfig
from serving.contracts.records import iter_records
from serving.log_sink import LogSink
from tests.unit.test_escalation_log import record


class Metrics:
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        self.counts[name] += value

    def log_written(self, records: int, size: int, rotations: int) -> None:
        self.counts["records"] += records


def test_a_full_disk_is_counted_reported_and_retried(tmp_path, monkeypatch):
    metrics = Metrics()
    sink = LogSink(LogConfig(dir=tmp_path), "replica-1", metrics)
    assert asyncio.run(sink.write([record(1)]))
    real_write = os.write

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    assert asyncio.run(sink.write([record(2)])) is False
    assert metrics.counts["protege_log_write_errors"] == 1 and sink.writer is None
    monkeypatch.setattr(os, "write", real_write)
    assert asyncio.run(sink.write([record(3)])) is False  # not retried before RETRY_S
    monkeypatch.setattr(log_sink, "RETRY_S", 0.0)
    sink._retry_at = 0.0
    assert asyncio.run(sink.write([record(4)]))  # the disk has room again: a new segment
    sink.close()
    assert [r.record_id for r in iter_records(tmp_path)] == ["rec1", "rec4"]
    assert metrics.counts["protege_log_write_errors"] == 2 and metrics.counts["records"] == 2


def test_an_unusable_folder_is_counted_at_start_and_serving_goes_on(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    metrics = Metrics()
    sink = LogSink(LogConfig(dir=blocker / "log"), "replica-1", metrics)
    assert sink.writer is None and metrics.counts["protege_log_write_errors"] == 1
    assert asyncio.run(sink.write([record(1)])) is False
    assert asyncio.run(sink.write([])) is True  # nothing to write is never an error


def test_a_ship_to_store_that_cannot_be_reached_at_start_is_an_error_naming_it(tmp_path):
    import pytest

    from serving.contracts.storage import StorageError

    config = LogConfig(dir=tmp_path, ship_to="s3://protege-unreachable/log")
    with pytest.raises(StorageError, match="s3://protege-unreachable/log"):
        LogSink(config, "replica-1", Metrics(), s3_endpoint="http://127.0.0.1:9")
