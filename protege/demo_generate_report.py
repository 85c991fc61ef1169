"""What the generative demo prints and draws: per round the live-traffic estimates (with
intervals and the sampled records behind them) beside the fixed gold holdout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protege.demo_report import ci, drop_text, print_live, print_table, serving_live


def _swap(seconds: float | str | None) -> str:
    if seconds is None:
        return ""
    return f", swap {seconds}" if isinstance(seconds, str) else f", swapped in {seconds:.1f} s"


def print_round(row: dict[str, Any]) -> None:
    lat = row["latency_ms"]
    print(
        f"round {row['round']}: served by {', '.join(row['served_versions'])}: escalation "
        f"{row['served_escalation_rate']:.1%} of {row['served_prompts']} prompts, "
        f"{row['throughput_rps']} req/s, p50/p95 {lat['p50']}/{lat['p95']} ms, "
        f"{row['failed_requests']} failed; distillation {row['distill_seconds']:.0f} s"
        + _swap(row["swap_seconds"])
    )
    print(f"  {row['result']}: {row['reason']}")
    training, cost = row.get("training") or {}, row.get("offline_generation") or {}
    if training:
        print(
            f"  trained on {training['examples']} pairs ({training['top_k_examples']} with the "
            f"teacher's top-k) in {training['seconds']:.0f} s; judged in "
            f"{cost.get('judge_seconds', 0):.0f} s"
        )
    print_live(row.get("decision") or {})
    likelihood = row.get("teacher_likelihood") or {}
    if likelihood.get("current") is not None:
        print(
            f"  log-likelihood of the teacher's gate answers: current {likelihood['current']:.3f}, "
            f"candidate {likelihood['candidate']:.3f}"
        )
    hold = row["holdout"]
    print(
        f"  gold holdout, serving {hold['version']}: escalation {hold['escalation_rate']:.1%}, "
        f"cascade agreement {hold['cascade_agreement']:.1%}, cascade ROUGE-L "
        f"{hold['cascade_rouge_l_gold']:.3f}, escalation needed {hold['escalation_needed']:.1%}"
    )


def print_summary(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    seed = summary["seed"]
    print_table(rows, seed, ("ROUGE-L", "cascade_rouge_l_gold", ">7.3f"))
    final, target = summary["final"], summary["settings"]["target_agreement"]
    print(
        f"\nescalation needed for {target:.0%} agreement with the teacher (ROUGE-L >= "
        f"{summary['agreement_cut']}) on {summary['holdout_prompts']} gold holdout prompts "
        "(95 % bootstrap):"
    )
    for name, fig in (("seed ", seed), ("final", final)):
        low, high = fig["escalation_needed_95"]
        print(f"  {name} {fig['version']}: {fig['escalation_needed']:.1%} [{low:.1%}, {high:.1%}]")
    print(
        f"ROUGE-L against the gold headlines: teacher {summary['teacher_rouge_l_gold']:.3f}; "
        f"student alone {seed['student_rouge_l_gold']:.3f} -> {final['student_rouge_l_gold']:.3f}"
    )
    print(
        f"{summary['rounds_promoted']} of {len(rows)} rounds promoted; "
        f"{summary['minutes_after_build']} minutes after the build "
        f"({summary['build_minutes']} building or checking the pair)"
    )


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rounds = [0] + [r["round"] for r in rows]
    needed = [summary["seed"]["escalation_needed"]] + [
        r["holdout"]["escalation_needed"] for r in rows
    ]
    holdout = [summary["seed"]["escalation_rate"]] + [r["holdout"]["escalation_rate"] for r in rows]
    live = [np.nan] + [
        (serving_live(r) or {}).get("escalation_rate", {}).get("value", np.nan) for r in rows
    ]
    served = [r["served_escalation_rate"] for r in rows]  # chunk r+1 is served by generation r
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, holdout, "o-", label="gold holdout escalation rate (own threshold)")
    ax.plot(rounds, needed, "^:", label="gold holdout escalation needed for the target")
    ax.plot(rounds, live, "d-", label="live-traffic estimate (logged records)")
    ax.plot(rounds[: len(served)], served, "s--", label="escalation while serving the next chunk")
    ax.set_xlabel("student generation (0 = seed; n = after round n)")
    ax.set_ylim(0, 1)
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("protege (generation): escalation by student generation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cost(row: dict[str, Any]) -> str:
    training, cost = row.get("training") or {}, row.get("offline_generation") or {}
    if not training:
        return f"{row['distill_seconds']:.0f} s, nothing trained"
    students = sum((cost.get("student_answers") or {}).values())
    return (
        f"{row['distill_seconds']:.0f} s: training {training['seconds']:.0f} s, "
        f"{cost.get('teacher_answers', 0)} teacher answers generated offline for training "
        f"({cost.get('teacher_seconds', 0):.0f} s), judging {cost.get('judge_seconds', 0):.0f} s "
        f"({students} student answers, teacher {cost.get('judge_teacher_seconds', 0):.0f} s)"
    )


def _likelihood(row: dict[str, Any]) -> str:
    both = row.get("teacher_likelihood") or {}
    if both.get("current") is None or both.get("candidate") is None:
        return "-"
    return f"{both['current']:.2f} -> {both['candidate']:.2f}"


def markdown(results: dict[str, Any], picture: str | None = None) -> str:
    """The run for the docs (block ``demo-generate`` of docs/generation.md): its settings,
    the per-round table with the live estimates and the gold holdout, and the totals."""
    rows, summary = results["rounds"], results["summary"]
    s, seed, final = summary["settings"], summary["seed"], summary["final"]
    lines = [
        f"`protege demo --task generate --seed {summary['demo_seed']}`: {s['rounds']} rounds of "
        f"{s['per_round']} stream prompts ({s['concurrency']} clients), target agreement "
        f"{s['target_agreement']:.0%} (ROUGE-L >= {summary['agreement_cut']}), audit fraction "
        f"{s['audit_fraction']}, evaluation share {s['eval_share']}, at least "
        f"{s['min_sampled']} sampled kept answers in the gate split, training "
        f"{s['epochs']} epochs at lr {s['lr']} with {s['replay_records']} replayed records; "
        f"{summary['minutes_after_build']} minutes after the build.",
        "",
        "| round | served by | served esc. | live esc. [95% CI] | sampled | live agreement "
        "| trained pairs | log-lik. of teacher answers, current -> candidate | distil s "
        "| holdout esc. | holdout needed | cascade ROUGE-L | needed drop [bound] | result |",
        "|" + "---|" * 14,
        f"| 0 | {seed['version']} | | | | | | | | {seed['escalation_rate']:.1%} "
        f"| {seed['escalation_needed']:.1%} | {seed['cascade_rouge_l_gold']:.3f} | | seed |",
    ]
    for row in rows:
        live = serving_live(row) or {}
        hold, training = row["holdout"], row.get("training") or {}
        lines.append(
            f"| {row['round']} | {', '.join(row['served_versions'])} "
            f"| {row['served_escalation_rate']:.1%} | {ci(live.get('escalation_rate'))} "
            f"| {live.get('escalation_rate', {}).get('sampled', '-')} "
            f"| {ci(live.get('cascade_agreement'))} | {training.get('examples', '-')} "
            f"| {_likelihood(row)} | {row['distill_seconds']:.0f} | {hold['escalation_rate']:.1%} "
            f"| {hold['escalation_needed']:.1%} | {hold['cascade_rouge_l_gold']:.3f} "
            f"| {drop_text(row.get('decision') or {})} | {row['result']} |"
        )
    low, high = seed["escalation_needed_95"]
    f_low, f_high = final["escalation_needed_95"]
    lines += [
        "",
        f"- {summary['rounds_promoted']} of {len(rows)} rounds promoted; "
        f"{sum(r['failed_requests'] for r in rows)} requests failed.",
        f"- Escalation needed for {s['target_agreement']:.0%} agreement on "
        f"{summary['holdout_prompts']} gold holdout prompts: seed {seed['escalation_needed']:.1%} "
        f"[{low:.1%}, {high:.1%}], final {final['escalation_needed']:.1%} "
        f"[{f_low:.1%}, {f_high:.1%}].",
        f"- ROUGE-L against the gold headlines: teacher {summary['teacher_rouge_l_gold']:.3f}; "
        f"student alone {seed['student_rouge_l_gold']:.3f} -> "
        f"{final['student_rouge_l_gold']:.3f}; cascade {seed['cascade_rouge_l_gold']:.3f} -> "
        f"{final['cascade_rouge_l_gold']:.3f}.",
        "- What each run cost (its report's `training` and `offline_generation`): "
        + "; ".join(f"round {r['round']}: {_cost(r)}" for r in rows)
        + ".",
        "- Each round's decision: "
        + "; ".join(f"round {r['round']}: {r['result']}: {r['reason']}" for r in rows),
    ]
    if picture:
        lines += ["", f"![the generative demo's learning curve]({picture})"]
    return "\n".join(lines) + "\n"


def spread(folders: list[Path]) -> str:
    """Several generative demo runs (``--seed``) side by side: how many rounds each
    promoted, and the holdout figures from the seed to the last student."""
    import json

    runs = [json.loads((Path(f) / "demo.json").read_text()) for f in folders]
    lines = [
        "| seed | results by round | gate: drop in esc. needed [bound] by round "
        "| holdout esc. needed seed -> final | cascade ROUGE-L seed -> final "
        "| student ROUGE-L seed -> final | minutes after the build |",
        "|---|---|---|---|---|---|---|",
    ]
    promoted, rounds = 0, 0
    for run in runs:
        summary, rows = run["summary"], run["rounds"]
        seed, final = summary["seed"], summary["final"]
        promoted += summary["rounds_promoted"]
        rounds += len(rows)
        lines.append(
            f"| {summary['demo_seed']} | {', '.join(r['result'] for r in rows)} "
            f"| {', '.join(drop_text(r.get('decision') or {}) for r in rows)} "
            f"| {seed['escalation_needed']:.1%} -> {final['escalation_needed']:.1%} "
            f"| {seed['cascade_rouge_l_gold']:.3f} -> {final['cascade_rouge_l_gold']:.3f} "
            f"| {seed['student_rouge_l_gold']:.3f} -> {final['student_rouge_l_gold']:.3f} "
            f"| {summary['minutes_after_build']} |"
        )
    lines.append(f"\nover {len(runs)} seeds: {promoted} of {rounds} rounds promoted")
    return "\n".join(lines)
