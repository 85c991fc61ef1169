"""The benchmark's arithmetic: the near-teacher threshold and the in-process limits."""

import numpy as np
import pytest

from protege.bench_inprocess import InProcess, threshold_near_teacher
from protege.bench_report import limit_rate


def probs_for(labels, confidence):
    out = np.full((len(labels), 3), 0.0)
    for i, (y, c) in enumerate(zip(labels, confidence, strict=True)):
        out[i] = (1 - c) / 2
        out[i, y] = c
    return out


def test_the_near_teacher_threshold_escalates_the_least_that_keeps_one_point():
    rng = np.random.default_rng(0)
    n = 1000
    gold = rng.integers(0, 3, n)
    confidence = rng.uniform(0.34, 1.0, n)
    # the student is right where it is confident, the teacher almost everywhere
    student_labels = np.where(confidence > 0.6, gold, (gold + 1) % 3)
    teacher_labels = np.where(rng.uniform(size=n) < 0.95, gold, (gold + 1) % 3)
    student, teacher = probs_for(student_labels, confidence), probs_for(teacher_labels, [0.9] * n)
    point = threshold_near_teacher(student, teacher, gold, "max_prob", points=0.01)
    assert point.accuracy >= point.teacher_accuracy - 0.01
    # one step lower (the next lower confidence) would lose more than the point
    lower = confidence[confidence < point.threshold].max()
    escalate = confidence < lower
    accuracy = np.where(escalate, teacher_labels == gold, student_labels == gold).mean()
    assert accuracy < point.teacher_accuracy - 0.01
    assert point.escalation_rate == pytest.approx((confidence < point.threshold).mean())


def test_a_student_as_good_as_the_teacher_escalates_nothing():
    gold = np.array([0, 1, 2, 0])
    probs = probs_for(gold, [0.9, 0.8, 0.7, 0.95])
    point = threshold_near_teacher(probs, probs, gold, "max_prob")
    assert point.escalation_rate == 0.0 and point.accuracy == point.teacher_accuracy == 1.0


def test_the_cascade_limit_pays_the_student_always_and_the_teacher_when_escalated():
    limits = {
        "student": InProcess("student", "s", {1: 60.0, 32: 300.0}, np.zeros((1, 3))),
        "teacher": InProcess("teacher", "t", {1: 12.0, 32: 30.0}, np.zeros((1, 3))),
    }
    assert limit_rate(limits, "student", 32, 0.5) == 300.0
    assert limit_rate(limits, "cascade", 1, 0.0) == 60.0
    assert limit_rate(limits, "cascade", 1, 0.2) == pytest.approx(1 / (1 / 60 + 0.2 / 12))


def bench_report():
    """A report with the fields `protege bench` writes, one in-process and one served row."""
    return {
        "student": {"version": "student-new", "seed": "student-seed", "learned": True},
        "requests": 600,
        "concurrency": 16,
        "threads_per_replica": 1,
        "rows": [
            {
                "scenario": "student on torch, in process, batch 1",
                "inputs_per_request": 1,
                "inputs_per_s": 90.3,
                "accuracy": 0.868,
            },
            {
                "scenario": "student-only (Serve, proxy)",
                "inputs_per_request": 1,
                "requests": 600,
                "throughput_rps": 64.8,
                "inputs_per_s": 64.8,
                "p50_ms": 246.0,
                "p99_ms": 349.8,
                "accuracy": 0.868,
                "escalation_rate": 0.0,
                "mean_batch": {"protege/student": {"mean": 5.9, "batches": 100}},
                "limit_inputs_per_s": 90.3,
                "share_of_limit": 0.72,
            },
        ],
        "summary": {
            "Serve, proxy": {
                "student_single_vs_in_process_batch_1": {
                    "what": "student, 1 input/request, x its batch-1 rate",
                    "value": 0.72,
                    "target": 2.0,
                    "met": False,
                }
            }
        },
    }


PAGE = "# Benchmark\n\nProse.\n\n<!-- bench:begin -->\nthe last run's table\n<!-- bench:end -->\n\nMore prose.\n"


def test_bench_writes_its_table_into_the_docs_page(tmp_path, monkeypatch, capsys):
    from protege import bench, cli
    from protege.bench_report import markdown

    report = bench_report()
    monkeypatch.setattr(bench, "run_bench", lambda *args: report)  # the run itself: minutes
    page = tmp_path / "benchmark.md"
    page.write_text(PAGE)
    assert cli.main(["bench", "--docs", str(page), "--out", str(tmp_path / "out")]) == 0
    table = markdown(report)
    assert "| student-only (Serve, proxy) | 1 | 64.8 |" in table and "| **no** |" in table
    assert page.read_text() == PAGE.replace("the last run's table", table.strip())
    assert f"written: the table into {page} (block bench)" in capsys.readouterr().out


def test_bench_checks_the_page_before_it_runs(tmp_path, monkeypatch, capsys):
    from protege import bench, cli

    ran = []
    monkeypatch.setattr(bench, "run_bench", lambda *args: ran.append(args) or bench_report())
    page = tmp_path / "benchmark.md"
    page.write_text("# Benchmark without markers\n")
    assert cli.main(["bench", "--docs", str(page)]) == 2
    assert ran == [] and "add the lines <!-- bench:begin -->" in capsys.readouterr().err
    assert page.read_text() == "# Benchmark without markers\n"
    monkeypatch.chdir(tmp_path)  # no docs/benchmark.md here: the default writes no page
    assert cli.main(["bench"]) == 0 and len(ran) == 1
    assert cli.main(["bench", "--docs", ""]) == 0 and len(ran) == 2
