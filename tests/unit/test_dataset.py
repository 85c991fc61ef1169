from test_escalation_log import record

from distill.dataset import read_watermark, read_window, write_watermark
from serving.escalation_log import EscalationLogWriter


def test_watermark_yields_each_record_once_across_runs(tmp_path):
    log = tmp_path / "log"
    writer = EscalationLogWriter(log)
    writer.append([record(i) for i in range(5)])
    first = read_window(log, {}, exclude_texts=set(), replay=0, seed=0)
    assert [r.record_id for r in first.new] == [f"req{i}:0" for i in range(5)]
    write_watermark(tmp_path / "reg", first.watermark)
    writer.append([record(i) for i in range(5, 8)])
    second = read_window(
        log, read_watermark(tmp_path / "reg"), exclude_texts=set(), replay=0, seed=0
    )
    assert [r.record_id for r in second.new] == ["req5:0", "req6:0", "req7:0"]
    third = read_window(log, second.watermark, exclude_texts=set(), replay=0, seed=0)
    assert third.new == []
    writer.close()


def test_duplicates_and_evaluation_texts_are_dropped(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1), record(2, text="a holdout headline"), record(3)])
    writer.append([record(1)])  # a retried request with the same id
    window = read_window(tmp_path, {}, exclude_texts={"a holdout headline"}, replay=0, seed=0)
    assert [r.record_id for r in window.new] == ["req1:0", "req3:0"]
    assert window.duplicates == 1 and window.excluded_holdout == 1
    writer.close()


def test_replay_samples_earlier_records_deterministically(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(i) for i in range(20)])
    consumed = read_window(tmp_path, {}, exclude_texts=set(), replay=0, seed=0)
    writer.append([record(i) for i in range(20, 25)])
    a = read_window(tmp_path, consumed.watermark, exclude_texts=set(), replay=6, seed=3)
    b = read_window(tmp_path, consumed.watermark, exclude_texts=set(), replay=6, seed=3)
    assert [r.record_id for r in a.replay] == [r.record_id for r in b.replay]
    assert len(a.replay) == 6 and {r.record_id for r in a.replay} <= {
        f"req{i}:0" for i in range(20)
    }
    assert [r.record_id for r in a.new] == [f"req{i}:0" for i in range(20, 25)]
    writer.close()


def test_torn_lines_are_counted_and_never_consumed(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1)])
    writer.close()
    with open(writer.current_segment, "ab") as handle:
        handle.write(record(2).model_dump_json().encode()[:30])
    window = read_window(tmp_path, {}, exclude_texts=set(), replay=0, seed=0)
    assert [r.record_id for r in window.new] == ["req1:0"]
    assert window.stats.skipped_lines == 1
    again = read_window(tmp_path, window.watermark, exclude_texts=set(), replay=0, seed=0)
    assert again.new == [] and again.stats.skipped_lines == 1
