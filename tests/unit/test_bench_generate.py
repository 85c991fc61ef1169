"""``protege bench --task generate``: its figures computed from measured answers, the
draft-reuse measurement on tiny real models (every verified answer is the teacher's plain
greedy one), the cascade in process, the served config and the CLI's docs blocks.

The runs on Ray Serve take minutes on the real pair; they are what `protege bench --task
generate` does, not a unit test. No test here reads a wall-clock figure as a promise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from generate_support import config as cascade_config
from tiny_lm import build_tiny_lm

from protege.bench_draft import CASES, drafts_from, measure_draft_reuse
from protege.bench_generate import generate_section, served_config
from protege.bench_generate_inprocess import IN_PROCESS, Answer, Measured, cascade_row, model_rows
from protege.bench_generate_report import (
    CASCADE,
    CASCADE_NO_DRAFT,
    SERVED,
    STUDENT_ALONE,
    TEACHER_ALONE,
    draft_markdown,
    draft_summary,
    markdown,
    row_figures,
    set_limits,
    summary,
)
from serving.config import GatewayConfig
from serving.generate.agreement import rouge_l
from serving.generate.draft_rule import break_even_share
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat
from serving.generate.student import load_student
from serving.generate.teacher_engine import tokenizer_digest

GOLD = ["Markets rise on tech", "Budget plan agreed", "Cat sits on mat"]
TEACHER = ["Tech shares lift markets", "Ministers agree budget", "The cat sat on the mat"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the figures --------------------------------------------------------------------------


def answer(text: str, tokens: int, latency: float, **fields) -> Answer:
    return Answer(text=text, completion_tokens=tokens, latency_s=latency, **fields)


def test_a_rows_figures_are_computed_from_its_answers():
    answers = [
        answer(
            "Tech shares lift markets",
            4,
            1.0,
            escalated=True,
            tier="teacher",
            accepted_share=0.5,
            teacher_seconds_saved=0.25,
            first_byte_s=0.5,
        ),
        None,  # failed
        answer(
            "A cat on a mat",
            5,
            3.0,
            escalated=True,
            tier="teacher",
            accepted_share=None,
            teacher_seconds_saved=None,
            first_byte_s=0.7,
        ),
    ]
    row = row_figures(Measured(CASCADE, SERVED, answers, 2.0), GOLD, TEACHER, cut=0.5)
    assert row["requests"] == 2 and row["failed"] == 1
    assert row["requests_per_s"] == pytest.approx(1.0) and row["tokens_per_s"] == 4.5
    assert row["p50_ms"] == pytest.approx(2000.0)
    assert row["p95_ms"] == pytest.approx(np.percentile([1.0, 3.0], 95) * 1000)
    assert row["first_byte_p50_ms"] == pytest.approx(600.0)
    assert row["escalated"] == 1.0
    gold = [rouge_l("Tech shares lift markets", GOLD[0]), rouge_l("A cat on a mat", GOLD[2])]
    assert row["gold_rouge_l"] == pytest.approx(np.mean(gold), abs=1e-4)
    versus = [1.0, rouge_l("A cat on a mat", TEACHER[2])]
    assert row["teacher_rouge_l"] == pytest.approx(np.mean(versus), abs=1e-4)
    assert row["teacher_agreement"] == np.mean([v >= 0.5 for v in versus])
    # the accepted share over escalated answers with a verified draft; the saving summed,
    # then spread over every escalated answer
    assert row["drafts_verified"] == 1 and row["accepted_draft_share"] == 0.5
    assert row["teacher_seconds_saved"] == 0.25
    assert row["teacher_seconds_saved_per_escalated"] == 0.125
    assert row["limit"] == CASCADE  # the cascade in process


def test_a_kept_answer_counts_no_draft_share_and_a_model_alone_has_no_teacher_figures():
    answers = [answer(t, 3, 0.5, accepted_share=1.0) for t in GOLD]
    row = row_figures(Measured("student, batch 8", IN_PROCESS, answers, 1.5), GOLD, None, 0.5)
    assert row["escalated"] == 0.0 and row["drafts_verified"] == 0
    assert row["accepted_draft_share"] is None and row["teacher_seconds_saved"] is None
    assert row["teacher_rouge_l"] is None and row["teacher_agreement"] is None
    assert row["gold_rouge_l"] == 1.0 and row["limit"] is None


def measured_rows() -> list[Measured]:
    def many(n: int, tokens: int, **fields) -> list[Answer | None]:
        return [answer(TEACHER[i % 3], tokens, 0.1, **fields) for i in range(n)]

    return [
        Measured("student, batch 8", IN_PROCESS, many(3, 4), 0.5),
        Measured("teacher, batch 8", IN_PROCESS, many(3, 4), 2.0),
        Measured(CASCADE, IN_PROCESS, many(3, 4, escalated=True, accepted_share=1.0), 1.0),
        Measured(CASCADE_NO_DRAFT, IN_PROCESS, many(3, 4, escalated=True), 1.5),
        Measured(STUDENT_ALONE, SERVED, many(3, 4), 1.0),
        Measured(TEACHER_ALONE, SERVED, many(3, 4), 3.0),
        Measured(CASCADE, SERVED, many(3, 4, escalated=True, accepted_share=1.0), 1.5),
        Measured(CASCADE_NO_DRAFT, SERVED, many(3, 4, escalated=True), 2.0),
    ]


def test_each_served_row_is_a_share_of_its_in_process_limit():
    rows = set_limits([row_figures(m, GOLD, TEACHER, 0.5) for m in measured_rows()])
    by = {(r["scenario"], r["stack"]): r for r in rows}
    pairs = {
        STUDENT_ALONE: "student, batch 8",
        TEACHER_ALONE: "teacher, batch 8",
        CASCADE: CASCADE,
        CASCADE_NO_DRAFT: CASCADE_NO_DRAFT,
    }
    for served, limit in pairs.items():
        row, base = by[(served, SERVED)], by[(limit, IN_PROCESS)]
        assert row["limit_requests_per_s"] == base["requests_per_s"]
        ratio = row["requests_per_s"] / base["requests_per_s"]
        assert row["share_of_limit"] == pytest.approx(ratio, abs=1e-3)
    assert "share_of_limit" not in by[("student, batch 8", IN_PROCESS)]
    s = summary(rows)
    assert s["cascade_vs_teacher_alone"] == pytest.approx(3.0 / 1.5, abs=1e-3)
    assert s["draft_reuse_gain_served"] == pytest.approx(2.0 / 1.5, abs=1e-3)
    assert s["draft_reuse_gain_in_process"] == pytest.approx(1.5, abs=1e-3)
    assert s["student_alone_vs_teacher_alone"] == pytest.approx(3.0, abs=1e-3)
    table = markdown({"description": "setting", "rows": rows, "summary": s})
    assert table.count("\n| ") == len(rows) + 1  # the header and one line a row
    assert "| cascade, draft reuse | Ray Serve | 2.00 | 8.0 |" in table
    assert "| 67% |" in table  # the served cascade: 2.00 of 3.00 requests/s in process
    assert "| 1.00 (3) |" in table  # the accepted share over 3 verified drafts
    assert "- the cascade (draft reuse) against the teacher alone: x2.00" in table


# --- the draft-reuse table ----------------------------------------------------------------


def synthetic_runs(seconds: dict[str, list[float]]) -> dict:
    runs = []
    for case, values in seconds.items():
        for i, s in enumerate(values):
            draft = None if case == "plain" else 10
            accepted = {"plain": None, "whole": 10, "half": 5, "none": 0}[case]
            runs.append(
                {
                    "prompt": i // 2,
                    "run": i % 2,
                    "case": case,
                    "seconds": s,
                    "forward_passes": {"plain": 10, "whole": 1, "half": 5, "none": 10}[case],
                    "draft_tokens": draft,
                    "accepted": accepted,
                    "seconds_saved": None if case == "plain" else 0.1 * i,
                    "equal": True,
                }
            )
    return {
        "teacher": "t-1",
        "max_new_tokens": 10,
        "prompt_tokens": [100, 120],
        "runs_per_prompt": 2,
        "runs": runs,
    }


def test_the_draft_table_pairs_each_way_with_plain_and_finds_the_break_even_share():
    plain = [2.0, 2.2, 1.8, 2.0]
    draft = synthetic_runs(
        {
            "plain": plain,
            "whole": [0.6, 0.7, 0.5, 0.6],
            "half": [1.4, 1.5, 1.3, 1.4],
            "none": [2.1, 2.4, 1.9, 2.1],
        }
    )
    figures = draft_summary(draft)
    cases = figures["cases"]
    assert cases["half"]["accepted_share"] == 0.5 and cases["none"]["accepted_share"] == 0.0
    assert cases["whole"]["seconds"] == pytest.approx(0.6)
    assert cases["whole"]["seconds_range"] == [0.5, 0.7]
    ratios = {
        c: float(np.median([s / p for s, p in zip(v, plain, strict=True)]))
        for c, v in (
            ("whole", [0.6, 0.7, 0.5, 0.6]),
            ("half", [1.4, 1.5, 1.3, 1.4]),
            ("none", [2.1, 2.4, 1.9, 2.1]),
        )
    }
    for case, ratio in ratios.items():
        assert cases[case]["time_over_plain"] == pytest.approx(ratio)
    assert cases["none"]["actual_saving"] == pytest.approx(np.median([-0.1, -0.2, -0.1, -0.1]))
    assert cases["half"]["forward_passes"] == 5 and cases["half"]["equal_to_plain"] == 4
    b = break_even_share(
        [(1.0, ratios["whole"]), (0.5, ratios["half"]), (0.0, ratios["none"])], 1.0
    )
    assert figures["break_even"] == pytest.approx(b, abs=1e-3)
    # at b the measured cost, interpolated, is plain generation's
    assert np.interp(b, [0.0, 0.5], [ratios["none"], ratios["half"]]) == pytest.approx(1.0)
    table = draft_markdown(draft)
    assert f"**b = {b:.2f}**" in table and "| half accepted | 0.50 |" in table
    assert "| 4 of 4 |" in table and "100-120 tokens" in table


def test_a_break_even_share_that_cannot_be_computed_says_so():
    draft = synthetic_runs(
        {"plain": [1.0] * 4, "whole": [1.2] * 4, "half": [0.8] * 4, "none": [1.1] * 4}
    )
    assert draft_summary(draft)["break_even"] is None
    assert "not computable" in draft_markdown(draft)


def test_the_drafts_are_the_reference_whole_changed_in_the_middle_and_at_the_start():
    drafts = drafts_from([5, 6, 7, 8], vocab=10)
    assert drafts == {
        "plain": None,
        "whole": [5, 6, 7, 8],
        "half": [5, 6, 8, 8],
        "none": [6, 6, 7, 8],
    }
    assert drafts_from([9, 9], vocab=10)["none"] == [0, 9]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-generate")
    return (
        build_tiny_lm(root / "student", seed=2, layers=1),
        build_tiny_lm(root / "teacher", seed=1, layers=2),
    )


@pytest.fixture(scope="module")
def teacher_lm(folders):
    return load_language_model(folders[1], device="cpu")


MESSAGES = [
    [{"role": "user", "content": "The cat sat on the mat"}],
    [{"role": "user", "content": "Markets rose today as shares in tech firms climbed."}],
]


def test_every_verified_answer_is_the_teachers_plain_greedy_one(teacher_lm):
    n = 8
    draft = measure_draft_reuse(teacher_lm, "teacher-1", MESSAGES, n, runs=2)
    runs = draft["runs"]
    assert len(runs) == len(MESSAGES) * 2 * len(CASES)
    assert all(r["equal"] for r in runs)
    expected = {  # forward passes, accepted draft tokens (of n drafted)
        "plain": (n, None),
        "whole": (1, n),
        "half": (n - n // 2, n // 2),
        "none": (n, 0),
    }
    for r in runs:
        passes, accepted = expected[r["case"]]
        assert (r["forward_passes"], r["accepted"]) == (passes, accepted), r
        assert r["draft_tokens"] == (None if r["case"] == "plain" else n)
    assert draft["prompt_tokens"] == [len(render_chat(teacher_lm.tokenizer, m)) for m in MESSAGES]
    # the reference is plain greedy generation itself, forced to n tokens
    figures = draft_summary(draft)
    assert figures["cases"]["whole"]["equal_to_plain"] == len(MESSAGES) * 2


# --- the cascade in process ---------------------------------------------------------------


def test_the_cascade_in_process_answers_with_the_teacher_and_reports_its_drafts(
    tmp_path, folders, teacher_lm
):
    config = cascade_config(tmp_path, threshold=1.0, max_new_tokens=8)  # everything escalates
    active = load_student(folders[0], config, "cpu")
    prompts = MESSAGES * 3
    rows = {}
    for name, cfg in (
        (CASCADE, config),
        (CASCADE_NO_DRAFT, config.model_copy(update={"draft_reuse": False})),
    ):
        rows[name] = cascade_row(
            name, cfg, active, teacher_lm, "teacher-1", prompts, 8, 4, MESSAGES
        )
    for row in rows.values():
        assert row.stack == IN_PROCESS and all(a is not None for a in row.answers)
        assert all(a.escalated and a.tier == "teacher" for a in row.answers)  # type: ignore[union-attr]
    reuse, scratch = rows[CASCADE].answers, rows[CASCADE_NO_DRAFT].answers
    assert {a.draft for a in scratch} == {"disabled"}  # type: ignore[union-attr]
    assert all(a.accepted_share is None for a in scratch)  # type: ignore[union-attr]
    verified = [a for a in reuse if a.draft == "verified"]  # type: ignore[union-attr]
    assert verified and all(0.0 <= a.accepted_share <= 1.0 for a in verified)  # type: ignore[operator]
    # the same greedy answers, whether the teacher started from the draft or not
    assert [a.text for a in reuse] == [a.text for a in scratch]  # type: ignore[union-attr]
    greedy = generate_batch(
        teacher_lm,
        [render_chat(teacher_lm.tokenizer, m) for m in MESSAGES],
        SamplingSettings(max_new_tokens=8),
    )
    assert [a.text for a in scratch[:2]] == [g.text for g in greedy]  # type: ignore[union-attr]
    assert active.model.tokenizer_digest == tokenizer_digest(teacher_lm.tokenizer)


def test_the_models_alone_answer_in_batches_as_generate_batch_does(folders):
    student = load_language_model(folders[0], device="cpu")
    rows = model_rows(student, "student", MESSAGES * 3, 6)
    assert [r.name for r in rows] == ["student, batch 1", "student, batch 8"]
    alone = generate_batch(
        student, [render_chat(student.tokenizer, m) for m in MESSAGES], SamplingSettings(6)
    )
    for row in rows:
        assert [a.text for a in row.answers[:2]] == [g.text for g in alone]  # type: ignore[union-attr]
    # a batch's requests all wait for the whole batch
    batch8 = rows[1].answers
    assert len({a.latency_s for a in batch8}) == 1  # type: ignore[union-attr]


# --- the served config and the CLI ---------------------------------------------------------


def both_kinds_config(tmp_path, folders) -> Path:
    path = tmp_path / "serve_config.yaml"
    app = {
        "name": "protege",
        "route_prefix": "/",
        "import_path": "serving.app:build_app",
        "args": {
            "student": {"path": "var/cache/models/student"},
            "teacher": {"path": "var/cache/models/teacher"},
            "cascade": {"scorer": "max_prob"},
            "access": {"required": False},
            "limits": {"max_body_bytes": 100000},
            "generate": {
                "student": {"path": str(folders[0])},
                "teacher": {"path": str(folders[1])},
                "target_agreement": 0.9,
                "registry": str(tmp_path / "registry"),
            },
        },
    }
    path.write_text(yaml.safe_dump({"applications": [app]}))
    return path


def test_the_served_config_holds_the_cascade_without_drafts_and_the_teacher_alone(
    tmp_path, folders
):
    section, shared = generate_section(both_kinds_config(tmp_path, folders))
    assert shared == {"limits": {"max_body_bytes": 100000}}  # the classification parts dropped
    config = served_config(section, shared, tmp_path / "out", tmp_path / "keys.yaml")
    apps = {a["route_prefix"]: a for a in config["applications"]}
    assert sorted(apps) == ["/", "/no-draft", "/teacher-alone"]
    gateways = {p: GatewayConfig.model_validate(a["args"]) for p, a in apps.items()}
    assert all(not g.classify and g.torch_threads == 1 for g in gateways.values())
    cascade, no_draft, alone = (gateways[p].generate for p in ("/", "/no-draft", "/teacher-alone"))
    assert cascade.draft_reuse and not no_draft.draft_reuse  # type: ignore[union-attr]
    assert cascade.audit_fraction == no_draft.audit_fraction == alone.audit_fraction == 0.0  # type: ignore[union-attr]
    assert cascade.target_agreement == 0.9 and cascade.registry is not None  # type: ignore[union-attr]
    assert alone.student.path == folders[1] and alone.threshold == 0.0  # type: ignore[union-attr]
    assert alone.registry is None and alone.target_agreement is None  # type: ignore[union-attr]
    logs = {g.generate.log.dir for g in gateways.values()}  # type: ignore[union-attr]
    assert len(logs) == 3  # each its own log
    cpus = sum(d["ray_actor_options"]["num_cpus"] for a in apps.values() for d in a["deployments"])
    assert cpus <= 2  # six replicas fit a 2-core machine


def test_a_config_without_a_generative_cascade_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"args": {"student": {"path": "s"}}}]}))
    with pytest.raises(SystemExit, match="no `generate:`"):
        generate_section(path)
    with pytest.raises(SystemExit, match="build-generate"):
        generate_section(tmp_path / "missing.yaml")


PAGE = (
    "# Generation\n\n<!-- draft-reuse:begin -->\nold draft table\n<!-- draft-reuse:end -->\n\n"
    "## Benchmark\n\n<!-- bench-generate:begin -->\nold bench\n<!-- bench-generate:end -->\n"
)


def test_bench_task_generate_writes_both_blocks_after_checking_the_page(
    tmp_path, monkeypatch, capsys
):
    from protege import bench_generate, cli

    rows = set_limits([row_figures(m, GOLD, TEACHER, 0.5) for m in measured_rows()])
    draft = synthetic_runs({c: [1.0, 0.9, 1.1, 1.0] for c in CASES})
    report = {
        "description": "setting",
        "rows": rows,
        "summary": summary(rows),
        "draft_reuse": draft,
    }
    ran = []
    monkeypatch.setattr(
        bench_generate, "run_generate_bench", lambda *args: ran.append(args) or report
    )
    page = tmp_path / "generation.md"
    page.write_text(PAGE.replace("<!-- draft-reuse:end -->", ""))
    assert cli.main(["bench", "--task", "generate", "--docs", str(page)]) == 2
    assert ran == [] and "draft-reuse" in capsys.readouterr().err
    page.write_text(PAGE)
    assert cli.main(["bench", "--task", "generate", "--docs", str(page)]) == 0
    args = ran[0]
    assert (args[1], args[2], args[5]) == (60, 8, "proxy")  # requests, clients, ingress
    text = page.read_text()
    assert markdown(report).strip() in text and draft_markdown(draft).strip() in text
    assert "old bench" not in text and "old draft table" not in text
    assert cli.main(["bench", "--task", "generate", "--ingress", "both", "--docs", ""]) == 2


def test_a_learned_student_is_measured_with_the_seed_pinned_as_its_reference(tmp_path, folders):
    import shutil

    from protege.bench_generate import pin_seed, seed_reference
    from serving.contracts.manifest import ModelManifest, read_manifest, write_manifest
    from serving.contracts.registry import Registry

    seed_folder = shutil.copytree(folders[0], tmp_path / "seed")
    write_manifest(seed_folder, ModelManifest(version="seed-1", role="student", created_at=0.0))
    registry = Registry(tmp_path / "registry")
    config = cascade_config(
        tmp_path, student={"path": str(seed_folder)}, registry=str(registry.root)
    )
    assert seed_reference(config, "seed-1") == ("seed-1", False)  # the seed is current
    assert seed_reference(config, "learned-2") == ("seed-1", False)  # it cannot be pinned
    registry.promote(registry.import_folder(seed_folder))
    assert read_manifest(registry.path("seed-1")) is not None
    assert seed_reference(config, "learned-2") == ("seed-1", True)
    served = served_config(
        {
            "student": {"path": str(seed_folder)},
            "teacher": {"path": str(folders[1])},
            "registry": str(registry.root),
        },
        {},
        tmp_path / "out",
        tmp_path / "keys.yaml",
    )
    pinned = pin_seed(served, "seed-1")
    by_name = {a["name"]: a for a in pinned["applications"]}
    gateway = next(d for d in by_name["cascade"]["deployments"] if d["name"] == "Gateway")
    assert gateway["user_config"] == {"generate": {"student_version": "seed-1"}}
    others = [d for n, a in by_name.items() if n != "cascade" for d in a["deployments"]]
    assert all("user_config" not in d for d in others)  # only the cascade is pinned
    assert "user_config" not in str(served)  # the served config itself is left as it was
