"""Rows, summary and markdown of ``protege bench --task generate``, and the draft-reuse
table with the break-even share it implies.

Every figure is computed here from the measured answers (:class:`Measured`), so a report
can be recomputed from its JSON: requests and tokens a second, latency, the escalated
share, ROUGE-L against gold and against the teacher's own answers, the accepted draft
share and the teacher time the drafts saved. Each served row is set against its
in-process limit (:data:`LIMITS`) as a share of that limit's requests a second.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np

from protege.bench_draft import ACCEPTED_SHARE, CASES
from protege.bench_generate_inprocess import IN_PROCESS, Measured
from serving.generate.agreement import rouge_l_many
from serving.generate.draft_rule import break_even_share

SERVED = "Ray Serve"
STUDENT_ALONE, TEACHER_ALONE = "student alone", "teacher alone"
CASCADE, CASCADE_NO_DRAFT = "cascade, draft reuse", "cascade, no draft reuse"
CASCADE_SEED = "cascade, seed student (reference)"  # only when the registry's student learned
LIMITS = {
    STUDENT_ALONE: "student, batch 8",
    TEACHER_ALONE: "teacher, batch 8",
    CASCADE: CASCADE,
    CASCADE_NO_DRAFT: CASCADE_NO_DRAFT,
}
"""The in-process row each served row is set against (concurrent clients let the served
batchers form batches of up to 8, so a model's limit is its batch-8 rate)."""


def _mean(values: Sequence[float] | np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if len(values) else None


def _ms(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if len(values) else None


def row_figures(
    measured: Measured, gold: Sequence[str], teacher: Sequence[str | None] | None, cut: float
) -> dict[str, Any]:
    """One row's figures. ``gold`` and ``teacher`` (the teacher's answers, None where it
    has none) are aligned with the row's answers; quality is over the answered ones."""
    answered = [(i, a) for i, a in enumerate(measured.answers) if a is not None]
    answers = [a for _, a in answered]
    tokens = sum(a.completion_tokens for a in answers)
    seconds = max(measured.seconds, 1e-9)
    versus_gold = rouge_l_many([a.text for a in answers], [gold[i] for i, _ in answered])
    pairs = [(a.text, teacher[i]) for i, a in answered if teacher and teacher[i] is not None]
    versus_teacher = rouge_l_many([p[0] for p in pairs], [str(p[1]) for p in pairs])
    escalated = [a for a in answers if a.escalated]
    shares = [a.accepted_share for a in escalated if a.accepted_share is not None]
    saved = [a.teacher_seconds_saved for a in escalated if a.teacher_seconds_saved is not None]
    first_bytes = [a.first_byte_s for a in answers if a.first_byte_s is not None]
    return {
        "scenario": measured.name,
        "stack": measured.stack,
        "requests": len(answers),
        "failed": len(measured.answers) - len(answers),
        "seconds": round(measured.seconds, 2),
        "requests_per_s": round(len(answers) / seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "mean_answer_tokens": _mean([a.completion_tokens for a in answers]),
        "p50_ms": _ms([a.latency_s for a in answers], 50),
        "p95_ms": _ms([a.latency_s for a in answers], 95),
        "first_byte_p50_ms": _ms(first_bytes, 50),
        "escalated": _mean([float(a.escalated) for a in answers]),
        "gold_rouge_l": _mean(versus_gold),
        "teacher_rouge_l": _mean(versus_teacher),
        "teacher_agreement": _mean(versus_teacher >= cut),
        "drafts_verified": len(shares),
        "accepted_draft_share": _mean(shares),
        "teacher_seconds_saved": round(sum(saved), 3) if saved else None,
        "teacher_seconds_saved_per_escalated": (
            round(sum(saved) / len(escalated), 4) if saved and escalated else None
        ),
        "limit": LIMITS.get(measured.name) if measured.stack == SERVED else None,
    }


def set_limits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each served row beside its in-process limit: that row's requests a second and the
    served share of it (tokens a second likewise)."""
    in_process = {r["scenario"]: r for r in rows if r["stack"] == IN_PROCESS}
    for row in rows:
        limit = in_process.get(row.get("limit") or "")
        if limit is None:
            continue
        row["limit_requests_per_s"] = limit["requests_per_s"]
        row["share_of_limit"] = round(row["requests_per_s"] / limit["requests_per_s"], 3)
        row["tokens_share_of_limit"] = round(row["tokens_per_s"] / limit["tokens_per_s"], 3)
    return rows


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if a is None or b is None or not b["requests_per_s"]:
        return None
    return round(a["requests_per_s"] / b["requests_per_s"], 3)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The comparisons the issue asks for, reported (never asserted)."""
    by = {(r["scenario"], r["stack"]): r for r in rows}

    def get(name: str, stack: str = SERVED) -> dict[str, Any] | None:
        return by.get((name, stack))

    return {
        "cascade_vs_teacher_alone": _ratio(get(CASCADE), get(TEACHER_ALONE)),
        "student_alone_vs_teacher_alone": _ratio(get(STUDENT_ALONE), get(TEACHER_ALONE)),
        "draft_reuse_gain_served": _ratio(get(CASCADE), get(CASCADE_NO_DRAFT)),
        "draft_reuse_gain_in_process": _ratio(
            get(CASCADE, IN_PROCESS), get(CASCADE_NO_DRAFT, IN_PROCESS)
        ),
        "escalated": {
            name: r["escalated"] for name in (CASCADE, CASCADE_SEED) if (r := get(name)) is not None
        },
        "share_of_limit": {
            r["scenario"]: r["share_of_limit"] for r in rows if "share_of_limit" in r
        },
        "gold_rouge_l": {
            name: r["gold_rouge_l"]
            for name in (TEACHER_ALONE, CASCADE, CASCADE_SEED, CASCADE_NO_DRAFT, STUDENT_ALONE)
            if (r := get(name)) is not None
        },
    }


def _cell(value: Any, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def markdown(report: dict[str, Any]) -> str:
    """The bench table (generated into docs/generation.md, block ``bench-generate``)."""
    lines = [report["description"], ""]
    lines += [
        "| row | stack | req/s | tokens/s | p50 ms | p95 ms | first byte p50 ms | escalated "
        "| ROUGE-L gold | ROUGE-L teacher | agrees | accepted draft share (drafts) "
        "| teacher s saved (per escalated) | limit req/s | share of limit |",
        "|" + "---|" * 15,
    ]
    for r in report["rows"]:
        saved = _cell(r["teacher_seconds_saved"], "{:.1f}")
        if r["teacher_seconds_saved_per_escalated"] is not None:
            saved += f" ({r['teacher_seconds_saved_per_escalated']:.3f})"
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        share = _cell(r["accepted_draft_share"], "{:.2f}")
        if share:
            share += f" ({r['drafts_verified']})"
        lines.append(
            f"| {r['scenario']}{failed} | {r['stack']} | {r['requests_per_s']:.2f} "
            f"| {r['tokens_per_s']:.1f} | {_cell(r['p50_ms'], '{:.0f}')} "
            f"| {_cell(r['p95_ms'], '{:.0f}')} | {_cell(r['first_byte_p50_ms'], '{:.0f}')} "
            f"| {_cell(r['escalated'], '{:.0%}')} | {_cell(r['gold_rouge_l'], '{:.3f}')} "
            f"| {_cell(r['teacher_rouge_l'], '{:.3f}')} "
            f"| {_cell(r['teacher_agreement'], '{:.0%}')} "
            f"| {share} | {saved} "
            f"| {_cell(r.get('limit_requests_per_s'), '{:.2f}')} "
            f"| {_cell(r.get('share_of_limit'), '{:.0%}')} |"
        )
    s = report["summary"]
    lines += ["", "Served, by requests a second:"]
    for key, what in (
        ("cascade_vs_teacher_alone", "the cascade (draft reuse) against the teacher alone"),
        ("student_alone_vs_teacher_alone", "the student alone against the teacher alone"),
        ("draft_reuse_gain_served", "the cascade with draft reuse against without"),
        ("draft_reuse_gain_in_process", "the same, in process"),
    ):
        if s.get(key) is not None:
            lines.append(f"- {what}: x{s[key]:.2f}")
    return "\n".join(lines) + "\n"


# --- the draft-reuse table --------------------------------------------------------------


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def draft_summary(draft: dict[str, Any]) -> dict[str, Any]:
    """Per way of :mod:`protege.bench_draft`: medians over every prompt and run of the
    teacher's seconds, its forward passes, the engine's estimated saving, the actual
    saving and time over plain generation (both paired: the same prompt and run), and how
    many verified answers equalled plain greedy. ``break_even`` is
    :func:`~serving.generate.draft_rule.break_even_share` over the measured
    (accepted share, time / plain) points (None when they do not fall with the share)."""
    runs = draft["runs"]
    plain = {(r["prompt"], r["run"]): r["seconds"] for r in runs if r["case"] == "plain"}
    cases: dict[str, dict[str, Any]] = {}
    for case in CASES:
        mine = [r for r in runs if r["case"] == case]
        seconds = [r["seconds"] for r in mine]
        base = [plain[(r["prompt"], r["run"])] for r in mine]
        estimates = [r["seconds_saved"] for r in mine if r["seconds_saved"] is not None]
        passes = [r["forward_passes"] for r in mine if r["forward_passes"] is not None]
        accepted = [r["accepted"] / r["draft_tokens"] for r in mine if r["draft_tokens"]]
        cases[case] = {
            "runs": len(mine),
            "accepted_share": _median(accepted),
            "seconds": _median(seconds),
            "seconds_range": [min(seconds), max(seconds)] if seconds else None,
            "time_over_plain": _median([s / p for s, p in zip(seconds, base, strict=True)]),
            "forward_passes": _median(passes),
            "estimated_saving": _median(estimates),
            "actual_saving": _median([p - s for s, p in zip(seconds, base, strict=True)]),
            "equal_to_plain": sum(r["equal"] for r in mine),
        }
    points = [
        (ACCEPTED_SHARE[c], cases[c]["time_over_plain"])
        for c in ACCEPTED_SHARE
        if cases[c]["time_over_plain"] is not None
    ]
    try:
        break_even: float | None = round(break_even_share(points, 1.0), 3)
    except ValueError:
        break_even = None
    return {"cases": cases, "break_even": break_even}


LABELS = {
    "plain": "none (plain generation)",
    "whole": "whole draft accepted",
    "half": "half accepted",
    "none": "none accepted",
}


def draft_markdown(draft: dict[str, Any]) -> str:
    """The draft-reuse table (block ``draft-reuse`` of docs/generation.md)."""
    figures = draft_summary(draft)
    tokens = draft["prompt_tokens"]
    n = draft["max_new_tokens"]
    lines = [
        f"Measured through the teacher engine by `protege bench --task generate` on teacher "
        f"`{draft['teacher']}` (one torch thread, batch 1), {len(tokens)} bench prompts of "
        f"{min(tokens)}-{max(tokens)} tokens, {n}-token greedy answers (end of sequence "
        f"turned off, so every answer has {n} tokens; each draft is as long as the answer), "
        f"medians over {len(tokens)} prompts x {draft['runs_per_prompt']} runs "
        "(seconds: median and range; savings and time / plain paired with the plain run "
        "of the same prompt and run):",
        "",
        "| draft | accepted share | teacher seconds | time / plain | teacher forward passes "
        "| estimated saving | actual saving | answer = plain greedy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        c = figures["cases"][case]
        low, high = c["seconds_range"] or (None, None)
        plain = case == "plain"
        equal = "-" if plain else f"{c['equal_to_plain']} of {c['runs']}"
        lines.append(
            f"| {LABELS[case]} | {'-' if plain else _cell(c['accepted_share'], '{:.2f}')} "
            f"| {_cell(c['seconds'], '{:.2f}')} ({_cell(low, '{:.2f}')}-{_cell(high, '{:.2f}')}) "
            f"| {_cell(c['time_over_plain'], '{:.2f}')} "
            f"| {_cell(c['forward_passes'], '{:.0f}')} "
            f"| {'-' if plain else _cell(c['estimated_saving'], '{:.2f} s')} "
            f"| {'-' if plain else _cell(c['actual_saving'], '{:.2f} s')} "
            f"| {equal} |"
        )
    b = figures["break_even"]
    lines += [
        "",
        (
            f"Break-even accepted share **b = {b:.2f}**: "
            if b is not None
            else "Break-even accepted share: not computable (the time did not fall as the "
            "accepted share rose): "
        )
        + "`draft_rule.break_even_share` over the (accepted share, time / plain) points "
        "above, at time / plain = 1.",
    ]
    return "\n".join(lines) + "\n"
