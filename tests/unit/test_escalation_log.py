import json
import os

import pytest

from serving.escalation_log import (
    EscalationLogWriter,
    EscalationRecord,
    ReadStats,
    iter_records,
    list_segments,
)


def record(i: int, text: str = "some headline") -> EscalationRecord:
    return EscalationRecord(
        record_id=f"req{i}:0",
        request_id=f"req{i}",
        timestamp=1_700_000_000.0 + i,
        text=text,
        reason="low_confidence",
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
    assert [r.record_id for r in iter_records(tmp_path)] == ["req1:0"]
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
    assert [r.record_id for r in iter_records(tmp_path)] == [f"req{i}:0" for i in range(10)]


def test_torn_last_line_is_skipped_and_counted(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1), record(2)])
    writer.close()
    segment = list_segments(tmp_path)[0]
    whole = record(3).model_dump_json().encode()
    with open(segment, "ab") as handle:
        handle.write(whole[: len(whole) // 2])  # a crash mid-write
    stats = ReadStats()
    assert [r.record_id for r in iter_records(tmp_path, stats)] == ["req1:0", "req2:0"]
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
    assert [r.record_id for r in iter_records(tmp_path, stats)] == ["req1:0"]
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
    assert sorted(r.record_id for r in iter_records(tmp_path)) == ["req1:0", "req2:0"]


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
    from serving.escalation_log import read_from

    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1), record(2)])
    segment = writer.current_segment
    first, offset = read_from(segment, 0)
    assert [r.record_id for r in first] == ["req1:0", "req2:0"]
    writer.append([record(3)])
    with open(segment, "ab") as handle:  # a torn line after it
        handle.write(record(4).model_dump_json().encode()[:40])
    stats = ReadStats()
    more, end = read_from(segment, offset, stats)
    assert [r.record_id for r in more] == ["req3:0"] and stats.skipped_lines == 1
    assert read_from(segment, end)[0] == []  # the torn line is never half-read
    writer.close()
