import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.contracts.records import (
    READABLE_VERSIONS,
    SCHEMA_VERSION,
    EscalationLogWriter,
    EscalationRecord,
    ReadStats,
    iter_records,
    iter_segment,
    list_segments,
)

GOLDEN = Path(__file__).parent / "golden"


def record(
    i: int,
    text: str = "some headline",
    *,
    inclusion_probability: float = 1.0,
    timestamp: float | None = None,
    reason: str = "low_confidence",
) -> EscalationRecord:
    """A current-version record answered by the teacher; its id is ``rec<i>`` and its
    request key ``key<i>`` (the server makes both: neither comes from the request id)."""
    return EscalationRecord(
        record_id=f"rec{i}",
        request_id=f"req{i}",
        request_key=f"key{i}",
        timestamp=1_700_000_000.0 + i if timestamp is None else timestamp,
        text=text,
        reason=reason,
        inclusion_probability=inclusion_probability,
        labels=["a", "b", "c"],
        student_version="s1",
        student_probs=[0.4, 0.35, 0.25],
        scorer="max_prob",
        confidence=0.4,
        threshold=0.6,
        teacher_version="t1",
        teacher_probs=[0.1, 0.8, 0.1],
        teacher_label="b",
    )


def version1_line(i: int, text: str = "an old headline") -> str:
    """A line as a version-1 writer wrote it: no inclusion probability, no teacher status,
    the record id made from the request id."""
    fields = json.loads(record(i, text).model_dump_json())
    del fields["inclusion_probability"], fields["teacher_status"], fields["request_key"]
    del fields["kind"]
    fields |= {"schema_version": 1, "record_id": f"req{i}:0"}
    return json.dumps(fields) + "\n"


def version2_line(i: int, text: str = "a headline") -> str:
    """A line as a version-2 writer wrote it: no request key."""
    fields = json.loads(record(i, text).model_dump_json())
    del fields["request_key"], fields["kind"]
    return json.dumps(fields | {"schema_version": 2}) + "\n"


def test_round_trip_keeps_every_field(tmp_path):
    writer = EscalationLogWriter(tmp_path, writer_id="replica#1")
    written = [record(i, text=f'text {i} with ünïcode and "quotes"\n') for i in range(10)]
    writer.append(written[:4])
    writer.append(written[4:])
    writer.close()
    assert list(iter_records(tmp_path)) == written


def test_records_are_readable_before_close(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1)])
    assert [r.record_id for r in iter_records(tmp_path)] == ["rec1"]
    writer.close()


def test_rotation_by_size_loses_and_splits_nothing(tmp_path):
    line_bytes = len(record(0).model_dump_json()) + 1
    writer = EscalationLogWriter(tmp_path, max_segment_bytes=3 * line_bytes)
    for i in range(10):
        writer.append([record(i)])
    writer.close()
    segments = list_segments(tmp_path)
    assert len(segments) == 4 and writer.rotations == 3
    assert all(s.stat().st_size <= 3 * line_bytes for s in segments)
    assert [r.record_id for r in iter_records(tmp_path)] == [f"rec{i}" for i in range(10)]


def test_torn_last_line_is_skipped_and_counted(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1), record(2)])
    writer.close()
    segment = list_segments(tmp_path)[0]
    whole = record(3).model_dump_json().encode()
    with open(segment, "ab") as handle:
        handle.write(whole[: len(whole) // 2])  # a crash mid-write
    stats = ReadStats()
    assert [r.record_id for r in iter_records(tmp_path, stats)] == ["rec1", "rec2"]
    assert stats.skipped_lines == 1 and "torn line" in stats.skipped_reasons[0]


def test_corrupt_and_foreign_schema_lines_are_skipped(tmp_path):
    path = tmp_path / "escalations-0000000000001-x-1-000001.jsonl"
    other = json.loads(record(2).model_dump_json()) | {"schema_version": 99}
    path.write_text(
        record(1).model_dump_json()
        + "\n"
        + "{not json\n"
        + json.dumps(other)
        + "\n"
        + json.dumps({"schema_version": 1, "text": "missing fields"})
        + "\n"
    )
    stats = ReadStats()
    assert [r.record_id for r in iter_records(tmp_path, stats)] == ["rec1"]
    assert stats.skipped_lines == 3
    assert any("schema version 99" in reason for reason in stats.skipped_reasons)


def test_writers_never_share_a_segment(tmp_path):
    first, second = (
        EscalationLogWriter(tmp_path, writer_id="a"),
        EscalationLogWriter(tmp_path, writer_id="b"),
    )
    first.append([record(1)])
    second.append([record(2)])
    assert first.current_segment != second.current_segment
    first.close()
    second.close()
    assert sorted(r.record_id for r in iter_records(tmp_path)) == ["rec1", "rec2"]


def test_close_fsyncs_and_refuses_later_writes(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    writer = EscalationLogWriter(tmp_path, fsync_interval_s=3600)
    writer.append([record(1)])
    writer.close()
    assert synced
    with pytest.raises(RuntimeError, match="closed"):
        writer.append([record(2)])


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_records(tmp_path / "nope"))


def test_read_from_an_offset_resumes_exactly_where_it_stopped(tmp_path):
    from serving.contracts.records import read_from

    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1), record(2)])
    segment = writer.current_segment
    first, offset = read_from(segment, 0)
    assert [r.record_id for r in first] == ["rec1", "rec2"]
    writer.append([record(3)])
    with open(segment, "ab") as handle:  # a torn line after it
        handle.write(record(4).model_dump_json().encode()[:40])
    stats = ReadStats()
    more, end = read_from(segment, offset, stats)
    assert [r.record_id for r in more] == ["rec3"] and stats.skipped_lines == 1
    assert read_from(segment, end)[0] == []  # the torn line is never half-read
    writer.close()


def test_new_records_are_version_4_with_an_inclusion_probability_and_a_request_key():
    audited = record(1, inclusion_probability=0.02, reason="audit")
    assert audited.schema_version == SCHEMA_VERSION == 4 and READABLE_VERSIONS == (1, 2, 3, 4)
    assert audited.kind == "classify" and '"kind":"classify"' in audited.model_dump_json()
    assert audited.teacher_status == "answered" and audited.evaluable
    assert audited.request_key == "key1"
    with pytest.raises(ValidationError, match="need inclusion_probability"):
        EscalationRecord.model_validate(record(2).model_dump() | {"inclusion_probability": None})
    for bad in (0.0, 1.5):
        with pytest.raises(ValidationError, match="inclusion_probability"):
            record(3, inclusion_probability=bad)
    for missing in (None, ""):
        with pytest.raises(ValidationError, match="need request_key"):
            EscalationRecord.model_validate(record(4).model_dump() | {"request_key": missing})


def test_cancelled_is_a_version_3_status_without_teacher_fields(tmp_path):
    fields = record(1).model_dump()
    fields |= {"teacher_version": None, "teacher_probs": None, "teacher_label": None}
    cancelled = EscalationRecord.model_validate(fields | {"teacher_status": "cancelled"})
    writer = EscalationLogWriter(tmp_path)
    writer.append([cancelled])
    writer.close()
    assert list(iter_records(tmp_path)) == [cancelled] and cancelled.evaluable
    with pytest.raises(ValidationError, match="'cancelled' in a version 2 record"):
        EscalationRecord.model_validate(
            fields | {"teacher_status": "cancelled", "schema_version": 2}
        )
    with pytest.raises(ValidationError, match="teacher_status 'cancelled' with a teacher"):
        EscalationRecord.model_validate(record(2).model_dump() | {"teacher_status": "cancelled"})


def test_the_golden_lines_of_every_version_are_still_read():
    """Lines as each schema version's writer wrote them, kept in a file: a reader that
    stops understanding an old version fails here, not on a shipped log."""
    stats = ReadStats()
    v1, v2, v3 = iter_segment(GOLDEN / "escalations-0000000000001-golden-1-000001.jsonl", stats)
    assert stats.skipped_lines == 0
    assert [r.schema_version for r in (v1, v2, v3)] == [1, 2, 3]
    assert v1.inclusion_probability is None and v1.teacher_status == "answered"
    assert v1.request_key is None and v2.request_key is None
    assert v2.inclusion_probability == 0.02 and v2.teacher_status == "skipped"
    assert v3.request_key == "9f1c2b7e4d3a4c5b8e6f7a8b9c0d1e2f" and v3.request_id == "client-1"
    assert v3.teacher_status == "cancelled" and v3.teacher_probs is None
    assert v3.inclusion_probability == 1.0 and v3.evaluable


def test_version_1_lines_are_still_read_but_never_evaluate(tmp_path):
    path = tmp_path / "escalations-0000000000001-old-1-000001.jsonl"
    path.write_text(version1_line(1) + record(2).model_dump_json() + "\n")
    stats = ReadStats()
    old, new = iter_records(tmp_path, stats)
    assert stats.skipped_lines == 0 and stats.records == 2
    assert old.schema_version == 1 and old.record_id == "req1:0"
    assert old.inclusion_probability is None and not old.evaluable
    assert old.teacher_status == "answered"  # a version-1 record always had the teacher's
    assert old.teacher_probs == [0.1, 0.8, 0.1] and old.teacher_label == "b"
    assert new.schema_version == 4 and new.evaluable


def test_version_2_lines_are_still_read_without_a_request_key(tmp_path):
    path = tmp_path / "escalations-0000000000001-old-1-000001.jsonl"
    path.write_text(version2_line(1) + record(2).model_dump_json() + "\n")
    stats = ReadStats()
    old, new = iter_records(tmp_path, stats)
    assert stats.skipped_lines == 0
    assert old.schema_version == 2 and old.request_key is None and old.evaluable
    assert new.schema_version == 4 and new.request_key == "key2"


def test_skipped_teacher_record_round_trips_without_teacher_fields(tmp_path):
    skipped = EscalationRecord(
        record_id="0" * 32,
        request_id="client-id",
        request_key="1" * 32,
        timestamp=1_700_000_000.0,
        text="audited while the teacher was not asked",
        reason="audit",
        inclusion_probability=0.02,
        labels=["a", "b", "c"],
        student_version="s1",
        student_probs=[0.9, 0.05, 0.05],
        scorer="max_prob",
        confidence=0.9,
        threshold=0.6,
        teacher_status="skipped",
    )
    writer = EscalationLogWriter(tmp_path)
    writer.append([skipped])
    writer.close()
    (back,) = iter_records(tmp_path)
    assert back == skipped
    assert back.teacher_status == "skipped" and back.evaluable
    assert back.teacher_version is back.teacher_probs is back.teacher_label is None


@pytest.mark.parametrize(
    ("status", "teacher"),
    [
        ("answered", {}),  # said answered, but no distribution
        ("failed", {"teacher_version": "t1", "teacher_probs": [0.1, 0.8, 0.1]}),
        ("skipped", {"teacher_probs": [0.1, 0.8, 0.1]}),
    ],
)
def test_teacher_status_must_match_the_teacher_fields(status, teacher):
    fields = record(1).model_dump()
    fields |= {"teacher_version": None, "teacher_probs": None, "teacher_label": None}
    with pytest.raises(ValidationError, match=f"teacher_status '{status}'"):
        EscalationRecord.model_validate(fields | {"teacher_status": status} | teacher)


def test_inconsistent_teacher_line_is_skipped_on_read(tmp_path):
    path = tmp_path / "escalations-0000000000001-x-1-000001.jsonl"
    bad = json.loads(record(2).model_dump_json()) | {"teacher_probs": None}
    path.write_text(record(1).model_dump_json() + "\n" + json.dumps(bad) + "\n")
    stats = ReadStats()
    assert [r.record_id for r in iter_records(tmp_path, stats)] == ["rec1"]
    assert stats.skipped_lines == 1 and "invalid record" in stats.skipped_reasons[0]


def test_a_slow_fsync_never_holds_up_an_append(tmp_path, monkeypatch):
    """The periodic fsync runs outside the append lock: appends go on while it blocks."""
    import threading

    writer = EscalationLogWriter(tmp_path, fsync_interval_s=3600)
    writer.append([record(1)])
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd):
        in_fsync.set()
        release.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    syncer = threading.Thread(target=writer.sync)
    syncer.start()
    assert in_fsync.wait(10)
    writer.append([record(2)])  # would deadlock here if sync held the lock during fsync
    assert release.is_set() is False
    release.set()
    syncer.join(10)
    monkeypatch.setattr(os, "fsync", real_fsync)
    writer.close()
    assert [r.record_id for r in iter_records(tmp_path)] == ["rec1", "rec2"]


def test_a_new_segment_fsyncs_its_directory(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    line_bytes = len(record(0).model_dump_json()) + 1
    writer = EscalationLogWriter(tmp_path, max_segment_bytes=line_bytes)
    assert str(tmp_path) in synced  # the first segment's name
    synced.clear()
    writer.append([record(1)])
    writer.append([record(2)])  # rotates
    assert writer.rotations == 1 and str(tmp_path) in synced
    writer.close()


def test_a_failed_rotation_keeps_the_old_segment_writable(tmp_path, monkeypatch):
    line_bytes = len(record(0).model_dump_json()) + 1
    writer = EscalationLogWriter(tmp_path, max_segment_bytes=line_bytes)
    writer.append([record(1)])

    def full_disk(**_):
        raise OSError(28, "No space left on device")

    real_open = writer._open_segment
    monkeypatch.setattr(writer, "_open_segment", full_disk)
    with pytest.raises(OSError):
        writer.append([record(2)])  # would rotate: the new segment cannot be opened
    monkeypatch.setattr(writer, "_open_segment", real_open)
    writer.append([record(3)])  # the writer still works once the disk does
    writer.close()
    assert [r.record_id for r in iter_records(tmp_path)] == ["rec1", "rec3"]


def test_a_write_that_fails_part_way_is_truncated_back(tmp_path, monkeypatch):
    writer = EscalationLogWriter(tmp_path, fsync_interval_s=3600)
    writer.append([record(1)])
    before = writer.current_segment.read_bytes()
    real_write = os.write
    calls = []

    def half_then_full_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[: len(data) // 2])  # the disk takes half
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        writer.append([record(2), record(3)])
    monkeypatch.setattr(os, "write", real_write)
    assert writer.current_segment.read_bytes() == before  # no half record left behind
    writer.append([record(4)])
    writer.close()
    stats = ReadStats()
    assert [r.record_id for r in iter_records(tmp_path, stats)] == ["rec1", "rec4"]
    assert stats.skipped_lines == 0


TORN_WRITER = """
import os, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {tests!r})
from test_escalation_log import record
from serving.contracts.records import EscalationLogWriter

real_write = os.write
def slow_halves(fd, data):  # each line reaches the kernel in two writes, far apart
    half = len(data) // 2
    done = real_write(fd, data[:half])
    open({marker!r}, "a").write("half\\n")
    time.sleep(0.5)
    return done + real_write(fd, data[half:])

writer = EscalationLogWriter({folder!r}, fsync_interval_s=3600)
writer.append([record(1), record(2)])
os.write = slow_halves
i = 3
while True:
    writer.append([record(i)])
    i += 1
"""


def test_a_line_torn_by_a_real_kill_is_skipped_and_counted(tmp_path):
    """A writer process is killed with SIGKILL between the two halves of a line: the reader
    returns every whole record once and counts the torn tail."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    marker, folder = tmp_path / "marker", tmp_path / "log"
    here = Path(__file__).resolve()
    script = TORN_WRITER.format(
        root=str(here.parents[2]), tests=str(here.parent), marker=str(marker), folder=str(folder)
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while (
            not marker.exists() or marker.read_text().count("half") < 2
        ) and child.poll() is None:
            assert time.monotonic() < deadline, "the writer never got going"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)  # mid-line: the second half never comes
    finally:
        child.kill()
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    stats = ReadStats()
    ids = [r.record_id for r in iter_records(folder, stats)]
    assert ids[:3] == ["rec1", "rec2", "rec3"] and len(ids) == len(set(ids))
    assert stats.skipped_lines == 1 and "torn line" in stats.skipped_reasons[0]


def test_a_nan_confidence_is_logged_and_read_back(tmp_path):
    """A model that answers NaN escalates (NaN is never trusted); JSON has no NaN, so the
    record is written with null and must read back, not be skipped as corrupt."""
    import math

    nan = float("nan")
    writer = EscalationLogWriter(tmp_path)
    writer.append(
        [record(0).model_copy(update={"confidence": nan, "student_probs": [nan, nan, nan]})]
    )
    writer.close()
    stats = ReadStats()
    (back,) = list(iter_records(tmp_path, stats))
    assert stats.skipped_lines == 0
    assert math.isnan(back.confidence) and all(math.isnan(p) for p in back.student_probs)
