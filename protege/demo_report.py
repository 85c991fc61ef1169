"""What the demo prints and draws: per round the live-traffic estimates (with intervals and
the sampled records behind them) beside the fixed BBC holdout figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def ci(figure: dict[str, Any] | None) -> str:
    if not figure:
        return "-"
    return f"{figure['value']:.1%} [{figure['low']:.1%}, {figure['high']:.1%}]"


def serving_live(row: dict[str, Any]) -> dict[str, Any] | None:
    """The live estimates of the student serving after the round (candidate if promoted)."""
    decision = row.get("decision") or {}
    side = "candidate" if row["result"] == "promoted" else "current"
    return decision.get(side)


def gate_figure(decision: dict[str, Any]) -> str:
    """The gate's figure: the drop in escalation needed for the target agreement, current
    minus candidate, with its one-sided bound and what it had to exceed."""
    drop = decision.get("escalation_drop")
    if not drop:
        return "-"
    needed = [decision[s]["escalation_needed"]["value"] for s in ("current", "candidate")]
    text = (
        f"escalation needed {needed[0]:.1%} -> {needed[1]:.1%}, drop {drop['value']:+.1%} "
        f"(bound {drop['low']:+.1%} > {decision.get('required_drop', 0):.1%}?)"
    )
    gain = decision.get("student_agreement_gain")
    if gain:
        text += f"; student agreement gain {gain['value']:+.1%} (bound {gain['low']:+.1%} > 0?)"
    return text


def drop_text(decision: dict[str, Any]) -> str:
    drop = decision.get("escalation_drop")
    return f"{drop['value']:+.1%} [{drop['low']:+.1%}]" if drop else "-"


def print_round(row: dict[str, Any]) -> None:
    lat = row["latency_ms"]
    print(
        f"round {row['round']}: served by {row['served_version']}: escalation "
        f"{row['served_escalation_rate']:.1%} of {row['served_inputs']}, {row['throughput_rps']} "
        f"req/s, p50/p99 student {lat['student']['p50']}/{lat['student']['p99']} ms, teacher "
        f"{lat['teacher']['p50']}/{lat['teacher']['p99']} ms, {row['failed_requests']} failed"
    )
    print(f"  {row['result']}: {row['reason']}")
    print_live(row.get("decision") or {})
    if row.get("calibration"):
        print(f"  thresholds calibrated on {row['calibration']['source']}")
    hold = row["holdout"]
    print(
        f"  BBC holdout, serving {hold['version']}: escalation {hold['escalation_rate']:.1%}, "
        f"cascade agreement {hold['cascade_agreement']:.1%}, cascade gold accuracy "
        f"{hold['cascade_gold_accuracy']:.1%}, escalation needed {hold['escalation_needed']:.1%}"
    )
    live = serving_live(row)
    if live:
        esc = live["escalation_rate"]
        inside = esc["low"] <= hold["escalation_rate"] <= esc["high"]
        print(
            f"  holdout escalation {'inside' if inside else 'outside'} the live interval "
            f"({esc['sampled']} sampled of {esc['records']} gate records)"
        )


def print_live(decision: dict[str, Any]) -> None:
    """Each student's live estimates with their intervals, and the gate's figure."""
    for side in ("current", "candidate"):
        figures = decision.get(side)
        if figures:
            print(
                f"  live {side:9} {figures['version']}: escalation {ci(figures['escalation_rate'])}, "
                f"cascade agreement {ci(figures['cascade_agreement'])}"
            )
    if gate_figure(decision) != "-":
        print(f"  gate: {gate_figure(decision)}")


def print_table(
    rows: list[dict[str, Any]], seed: dict[str, Any], quality: tuple[str, str, str]
) -> None:
    """The per-round table: served and live escalation, the holdout, the gate's drop.
    ``quality`` is the holdout's quality column: (header, holdout key, format spec)."""
    name, key, spec = quality
    width = int(spec.lstrip(">").split(".")[0])
    head = (
        f"{'round':>5} | {'served esc.':>11} | {'live esc. [95% CI]':>24} | {'sampled':>7} | "
        f"{'live agreement':>24} | {'holdout esc.':>12} | {name:>{width}} | "
        f"{'needed drop [bound]':>22} | result"
    )
    print("\n" + head + "\n" + "-" * len(head))
    print(
        f"{0:>5} | {'':>11} | {'':>24} | {'':>7} | {'':>24} | {seed['escalation_rate']:>12.1%} | "
        f"{seed[key]:{spec}} | {'':>22} | seed student"
    )
    for row in rows:
        live = serving_live(row) or {}
        hold = row["holdout"]
        sampled = live.get("escalation_rate", {}).get("sampled", "-")
        print(
            f"{row['round']:>5} | {row['served_escalation_rate']:>11.1%} | "
            f"{ci(live.get('escalation_rate')):>24} | {sampled!s:>7} | "
            f"{ci(live.get('cascade_agreement')):>24} | {hold['escalation_rate']:>12.1%} | "
            f"{hold[key]:{spec}} | {drop_text(row.get('decision') or {}):>22} | "
            f"{row['result']}"
        )


def print_summary(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    seed = summary["seed"]
    print_table(rows, seed, ("gold acc", "cascade_gold_accuracy", ">8.1%"))
    final = summary["final"]
    print(
        f"\nescalation needed for a cascade within 1 point of the teacher's gold accuracy and at "
        f">= 98 % agreement, on {summary['holdout_inputs']} held-out BBC inputs (95 % bootstrap):"
    )
    for name, fig in (("seed ", seed), ("final", final)):
        low, high = fig["escalation_needed_95"]
        print(f"  {name} {fig['version']}: {fig['escalation_needed']:.1%} [{low:.1%}, {high:.1%}]")
    print(f"  final / seed = {summary['ratio_final_to_seed']:.2f}")
    print(
        f"gold holdout headlines: teacher {summary['teacher_gold_accuracy']:.1%}; student alone "
        f"{seed['student_gold_accuracy']:.1%} -> {final['student_gold_accuracy']:.1%}"
    )


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [0] + [r["round"] for r in rows]
    holdout = [summary["seed"]["escalation_rate"]] + [r["holdout"]["escalation_rate"] for r in rows]
    live = [np.nan] + [
        (serving_live(r) or {}).get("escalation_rate", {}).get("value", np.nan) for r in rows
    ]
    served = [r["served_escalation_rate"] for r in rows]  # chunk r+1 is served by generation r
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, holdout, "o-", label="BBC holdout escalation rate (own threshold)")
    ax.plot(rounds, live, "d-", label="live-traffic estimate (weighted log records)")
    ax.plot(rounds[: len(served)], served, "s--", label="escalation while serving the next chunk")
    ax.set_xlabel("student generation (0 = seed; n = after round n)")
    ax.set_ylim(0, 1)
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("protege: the student learns what it used to escalate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def spread(folders: list[Path]) -> str:
    """A table of several demo runs (``--seed``) side by side, and the range of each
    headline figure: one run tells a story, several tell how steady it is."""
    import json

    runs = [json.loads((Path(f) / "demo.json").read_text()) for f in folders]
    lines = [
        "| seed | results by round | gate: drop in esc. needed [bound] by round | "
        "live esc. after the last round [95% CI] | sampled | "
        "holdout esc. seed -> final | gold acc. seed -> final | esc. needed seed -> final | final / seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios, finals = [], []
    for run in runs:
        summary, rows = run["summary"], run["rounds"]
        live = next((serving_live(r) for r in reversed(rows) if serving_live(r)), None) or {}
        esc = live.get("escalation_rate")
        seed, final = summary["seed"], summary["final"]
        ratios.append(summary["ratio_final_to_seed"])
        finals.append(final["escalation_rate"])
        lines.append(
            f"| {summary['demo_seed']} | {', '.join(r['result'] for r in rows)} | "
            f"{', '.join(drop_text(r.get('decision') or {}) for r in rows)} | {ci(esc)} | "
            f"{esc['sampled'] if esc else '-'} | {seed['escalation_rate']:.1%} -> "
            f"{final['escalation_rate']:.1%} | {seed['cascade_gold_accuracy']:.1%} -> "
            f"{final['cascade_gold_accuracy']:.1%} | {seed['escalation_needed']:.1%} -> "
            f"{final['escalation_needed']:.1%} | {summary['ratio_final_to_seed']:.2f} |"
        )
    lines.append(
        f"\nover {len(runs)} seeds: final holdout escalation {min(finals):.1%} to "
        f"{max(finals):.1%}; escalation needed, final / seed, {min(ratios):.2f} to {max(ratios):.2f}"
    )
    return "\n".join(lines)
