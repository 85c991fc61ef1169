"""``protege init TASK.yaml``: bad input is one clear line (exit 2); a good task is made
ready to serve and to distil."""

from __future__ import annotations

import csv
import json
import random
import shutil
import time
from pathlib import Path

import pytest
import yaml
from tiny_models import build_tiny

from distill.config import DistillConfig
from protege.cli import main
from serving.classify.scorers import SCORERS
from serving.config import GatewayConfig
from serving.contracts.manifest import ModelManifest, write_manifest
from serving.contracts.registry import Registry

LABELS = ["billing", "technical", "account"]
WORDS = [
    "invoice",
    "refund",
    "charge",
    "card",
    "payment",
    "login",
    "password",
    "reset",
    "error",
    "crash",
    "slow",
    "update",
    "install",
    "profile",
    "email",
    "address",
    "plan",
    "upgrade",
    "cancel",
    "screen",
    "app",
    "broken",
    "twice",
    "account",
    "billing",
    "please",
    "help",
    "urgent",
    "again",
    "today",
]


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) + f" #{i}" for i in range(n)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 3-label tiny student (mean-pooled) and teacher, built once."""
    root = tmp_path_factory.mktemp("task-models")
    student = build_tiny(root / "student", seed=11, mean_pool=True, labels=LABELS)
    teacher = build_tiny(root / "teacher", seed=12, mean_pool=False, labels=LABELS)
    return student, teacher


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """Run from the test's folder: nothing lands in the repository, whatever the defaults."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    """``rows`` in the format the suffix names."""
    if path.suffix == ".csv":
        return write_csv(path, rows, list(rows[0]))
    if path.suffix == ".parquet":
        return write_parquet(path, rows)
    return write_jsonl(path, rows)


def traffic(folder: Path, n: int = 50) -> Path:
    return write_jsonl(folder / "traffic.jsonl", [{"text": t} for t in sentences(n, seed=1)])


def gold(folder: Path, n: int = 12, bad_label: str | None = None) -> Path:
    rows = [{"text": t, "label": LABELS[i % 3]} for i, t in enumerate(sentences(n, seed=2))]
    if bad_label is not None:
        rows[5]["label"] = bad_label
    return write_csv(folder / "gold.csv", rows, ["text", "label"])


def write_task(folder: Path, **fields: object) -> Path:
    """A task file; a field given as None is left out. Paths are written as given
    (relative ones resolve against the task file's folder)."""
    task: dict[str, object] = {"name": "support-tickets", "workdir": "work"}
    task |= fields
    task = {k: str(v) if isinstance(v, Path) else v for k, v in task.items() if v is not None}
    path = folder / "task.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False))
    return path


def init(task: Path, *extra: str) -> int:
    return main(["init", str(task), *extra])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n")
    assert err.count("\n") == 1, f"expected a one-line error, got:\n{err}"
    return err


# --- bad input: exit 2 and one line naming the field or the file ----------------------


def run_bad(task: Path, capsys) -> str:
    capsys.readouterr()  # what building the test's models printed
    assert init(task) == 2
    return one_line_error(capsys)


@pytest.mark.parametrize(
    "student_labels",
    [["billing", "technical", "refund"], ["technical", "billing", "account"]],
    ids=["other-names", "same-names-other-order"],
)
def test_student_labels_must_be_the_teachers_in_order(here, pair, capsys, student_labels):
    student = build_tiny(here / "odd-student", seed=3, mean_pool=True, labels=student_labels)
    task = write_task(here, teacher=pair[1], student=student, traffic=traffic(here))
    err = run_bad(task, capsys)
    assert "student" in err and str(student) in err
    assert str(student_labels) in err and str(LABELS) in err
    assert "same order" in err


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_traffic_without_the_text_column_names_the_column(here, pair, capsys, fmt):
    rows = [{"body": t, "id": str(i)} for i, t in enumerate(sentences(5, seed=1))]
    path = write_rows(here / f"traffic.{fmt}", rows)
    task = write_task(here, teacher=pair[1], student=pair[0], traffic=path)
    err = run_bad(task, capsys)
    assert str(path) in err and "no 'text' column" in err and "body" in err


def test_a_custom_text_column_is_the_one_named(here, pair, capsys):
    task = write_task(
        here, teacher=pair[1], student=pair[0], traffic=traffic(here), text_column="message"
    )
    assert "no 'message' column" in run_bad(task, capsys)


@pytest.mark.parametrize("content", ["", "\n\n", "text\n"], ids=["empty", "blank", "header-only"])
def test_an_empty_traffic_file_is_refused(here, pair, capsys, content):
    path = here / ("traffic.csv" if content.startswith("text") else "traffic.jsonl")
    path.write_text(content)
    task = write_task(here, teacher=pair[1], student=pair[0], traffic=path)
    err = run_bad(task, capsys)
    assert str(path) in err and "no rows" in err


def test_a_traffic_row_without_text_is_refused(here, pair, capsys):
    path = write_jsonl(here / "traffic.jsonl", [{"text": "fine"}, {"text": "  "}])
    task = write_task(here, teacher=pair[1], student=pair[0], traffic=path)
    assert "row 2 has no text in column 'text'" in run_bad(task, capsys)


def test_a_gold_label_outside_the_teachers_labels_is_named(here, pair, capsys):
    path = gold(here, bad_label="shipping")
    task = write_task(here, teacher=pair[1], student=pair[0], traffic=traffic(here), gold=path)
    err = run_bad(task, capsys)
    assert str(path) in err and "row 6" in err and "'shipping'" in err and str(LABELS) in err


def test_a_missing_required_field_is_named(here, pair, capsys):
    task = write_task(here, student=pair[0], traffic=traffic(here))  # no teacher
    err = run_bad(task, capsys)
    assert str(task) in err and "field 'teacher'" in err and "required" in err.lower()


def test_an_unknown_field_is_named(here, pair, capsys):
    task = write_task(here, teacher=pair[1], student=pair[0], traffic=traffic(here), teachr="x")
    err = run_bad(task, capsys)
    assert str(task) in err and "field 'teachr'" in err


def test_an_unknown_scorer_is_named(here, pair, capsys):
    task = write_task(here, teacher=pair[1], student=pair[0], traffic=traffic(here), scorer="vibes")
    err = run_bad(task, capsys)
    assert "field 'scorer'" in err and "vibes" in err and "max_prob" in err


def test_a_missing_or_broken_task_file_is_one_line(here, capsys):
    assert init(here / "nope.yaml") == 2
    assert "task file not found" in one_line_error(capsys)
    broken = here / "broken.yaml"
    broken.write_text("name: [unclosed\nteacher: x\n")
    assert init(broken) == 2
    assert "not valid YAML" in one_line_error(capsys)
    listed = here / "list.yaml"
    listed.write_text("- teacher\n- student\n")
    assert init(listed) == 2
    assert "expected a mapping" in one_line_error(capsys)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_model_folder_without_safetensors_says_so(here, pair, capsys, role):
    folders = {"student": pair[0], "teacher": pair[1]}
    folders[role] = shutil.copytree(folders[role], here / f"my-{role}")
    (folders[role] / "model.safetensors").unlink()
    task = write_task(here, traffic=traffic(here), **folders)
    err = run_bad(task, capsys)
    assert role in err and str(folders[role]) in err and "safetensors" in err


def test_a_missing_model_folder_is_named(here, pair, capsys):
    task = write_task(here, teacher=here / "nowhere", student=pair[0], traffic=traffic(here))
    err = run_bad(task, capsys)
    assert "teacher" in err and "nowhere" in err and "not found" in err


# --- a good task -----------------------------------------------------------------------


def check_ready(work: Path, report: str, n_traffic: int) -> str:
    """What init leaves in ``work`` and prints; returns the seed's version."""
    for name in SCORERS:
        assert name in report
    for target in ("90%", "95%", "97%", "98%", "99%", "100%"):
        assert any(line.strip().startswith(target) for line in report.splitlines()), target

    serve = yaml.safe_load((work / "serve_config.yaml").read_text())
    gateway = GatewayConfig.model_validate(serve["applications"][0]["args"])
    assert gateway.registry == str(work / "registry")
    assert gateway.student.path == work / "models" / "student"
    assert gateway.teacher.path == work / "models" / "teacher"
    assert gateway.log.dir == work / "escalations"
    assert gateway.cascade.scorer == "margin" and gateway.cascade.audit_fraction == 0.05

    distill = DistillConfig.model_validate(yaml.safe_load((work / "distill.yaml").read_text()))
    assert distill.registry == str(work / "registry")
    assert distill.log_dir == str(work / "escalations")
    assert distill.teacher == work / "models" / "teacher" and distill.scorer == "margin"
    assert distill.gate.target_agreement == 0.9
    assert distill.traffic is not None and distill.traffic.is_file()
    assert len(distill.traffic.read_text().splitlines()) == n_traffic

    registry = Registry(work / "registry")
    current = registry.current()
    assert current is not None and current.startswith("student-")
    manifest = registry.manifest(current)
    assert manifest.role == "student" and manifest.labels == LABELS
    assert manifest.default_target is not None
    assert manifest.default_target.target_agreement == 0.9
    calibration = manifest.calibration
    assert calibration is not None and calibration.kind == "traffic_sample"
    assert len(calibration.agrees_with_teacher) == n_traffic
    assert set(calibration.confidences) == set(SCORERS)
    assert all(len(v) == n_traffic for v in calibration.confidences.values())
    assert manifest.eval["traffic_texts"] == n_traffic
    assert f"seed student {current}" in report
    return current


def test_init_makes_a_three_label_task_ready(here, pair, capsys):
    task = write_task(
        here,
        teacher=pair[1],
        student=pair[0],
        traffic=traffic(here),
        gold=gold(here),
        scorer="margin",
        target_agreement=0.9,
        audit_fraction=0.05,
    )
    assert init(task) == 0
    out = capsys.readouterr()
    assert "error" not in out.err
    work = here / "work"
    version = check_ready(work, out.out, n_traffic=50)
    assert "gold accuracy on 12 texts" in out.out
    distill = yaml.safe_load((work / "distill.yaml").read_text())
    gold_rows = [json.loads(line) for line in Path(distill["gold"]).read_text().splitlines()]
    assert len(gold_rows) == 12 and {r["label"] for r in gold_rows} == set(LABELS)
    assert not (pair[0] / "protege.json").exists()  # the user's folders stay untouched
    assert not (pair[1] / "protege.json").exists()

    # again, without --force: the seed is still current, so nothing to refuse
    assert init(task) == 0
    capsys.readouterr()
    registry = Registry(work / "registry")
    assert registry.current() == version and [m.version for m in registry.versions()] == [version]

    # once another version is current, init would take it back: only with --force
    other = build_tiny(here / "other", seed=13, mean_pool=True, labels=LABELS)
    write_manifest(
        other,
        ModelManifest(
            version="student-other", role="student", created_at=time.time(), labels=LABELS
        ),
    )
    registry.import_folder(other)
    registry.promote("student-other")
    err = run_bad(task, capsys)
    assert "student-other" in err and "--force" in err
    assert registry.current() == "student-other"
    assert init(task, "--force") == 0
    capsys.readouterr()
    assert registry.current() == version
    assert registry.history() == [version, "student-other"]  # rollback goes back to it


def test_init_reads_parquet_traffic_and_samples_it(here, pair, capsys):
    rows = [{"message": t, "n": i} for i, t in enumerate(sentences(60, seed=4))]
    path = write_parquet(here / "traffic.parquet", rows)
    task = write_task(
        here,
        teacher=pair[1].resolve(),
        student=pair[0].resolve(),
        traffic=path.name,  # relative to the task file
        text_column="message",
        workdir=str(here / "elsewhere"),
        scorer="margin",
        target_agreement=0.9,
        audit_fraction=0.05,
        traffic_limit=40,
    )
    assert init(task) == 0
    check_ready(here / "elsewhere", capsys.readouterr().out, n_traffic=40)
    assert not (here / "work").exists()


def test_the_tasks_max_tokens_reaches_training_calibration_and_serving(here, pair, capsys):
    from serving.classify.classifier import Classifier
    from serving.classify.student import load_student

    task = write_task(here, teacher=pair[1], student=pair[0], traffic=traffic(here), max_tokens=24)
    assert init(task) == 0
    capsys.readouterr()
    work = here / "work"
    serve = yaml.safe_load((work / "serve_config.yaml").read_text())
    gateway = GatewayConfig.model_validate(serve["applications"][0]["args"])
    assert gateway.student.max_tokens == gateway.teacher.max_tokens == 24
    distill = DistillConfig.model_validate(yaml.safe_load((work / "distill.yaml").read_text()))
    assert distill.train.max_tokens == 24  # what the job trains and calibrates at
    registry = Registry(work / "registry")
    seed = registry.current()
    assert seed is not None and registry.manifest(seed).max_tokens == 24  # calibrated at 24
    # served at the length it was calibrated at, whatever a config says
    served = load_student(registry.path(seed), gateway.cascade, "cpu", 128, LABELS)
    assert served.model.max_tokens == 24
    assert Classifier(work / "models" / "teacher", "cpu", max_tokens=128).max_tokens == 24
