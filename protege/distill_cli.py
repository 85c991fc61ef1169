"""``protege distill run`` and ``protege distill watch``."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("deploy/distill.yaml")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smh]?)$")


def parse_duration(text: str) -> float:
    """'15m', '90s', '1h' or plain seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m or 1h")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


FIGURES = (
    ("escalation_needed", "esc. needed"),
    ("escalation_rate", "escalation rate"),
    ("cascade_agreement", "cascade agreement"),
    ("student_agreement", "student agreement"),
    ("cascade_gold_accuracy", "cascade gold acc."),
)


def summary(report: dict[str, Any]) -> str:
    """The run's decision and, when it judged, both students' live-traffic estimates."""
    lines = [f"run {report.get('run_id', '?')}: {report['result']} - {report['reason']}"]
    decision = report.get("decision", {})
    if "current" in decision:
        cur, cand = decision["current"], decision["candidate"]
        lines.append(f"{'':20}{'current':>34}{'candidate':>34}")
        lines.append(f"{'threshold':20}{cur['threshold']:>34.4f}{cand['threshold']:>34.4f}")
        for key, name in FIGURES:
            if key in cur:
                lines.append(f"{name:20}{_interval(cur[key]):>34}{_interval(cand[key]):>34}")
        # escalation_drop is the gate's figure: the escalation each student needs for the
        # target agreement (calibrated within each resample), current minus candidate
        drop = decision["escalation_drop"]
        lines.append(
            f"drop in escalation needed {drop['value']:+.1%}, one-sided lower bound "
            f"{drop['low']:+.1%} (must exceed {decision.get('required_drop', 0):.1%}); "
            f"evidence: {drop['sampled']} sampled of {drop['records']} gate records; "
            f"thresholds calibrated on {report['calibration']['source']}"
        )
        gain = decision.get("student_agreement_gain")
        if gain:
            lines.append(
                f"the current student needs no escalation: student agreement gain "
                f"{gain['value']:+.1%}, lower bound {gain['low']:+.1%} (must exceed 0)"
            )
    if "window" in report:
        lines.append("window: " + ", ".join(f"{k}={v}" for k, v in report["window"].items()))
    return "\n".join(lines)


def _interval(figure: dict[str, Any]) -> str:
    return f"{figure['value']:.1%} [{figure['low']:.1%}, {figure['high']:.1%}]"


def _load(args: argparse.Namespace):
    from distill.config import load_distill_config

    overrides: dict[str, Any] = {}
    if getattr(args, "min_records", None) is not None:
        overrides["min_records"] = args.min_records
    config = load_distill_config(args.config, **overrides)
    if getattr(args, "workers", None):
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"workers": args.workers})}
        )
    return config


def _runner(config: Any) -> Any:
    """The job of the config's kind."""
    from distill.generate_config import GenerateDistillConfig

    if isinstance(config, GenerateDistillConfig):
        from distill.generate_job import run_generate

        return run_generate
    from distill.job import run

    return run


def _run(args: argparse.Namespace) -> int:
    from distill.lock import LockedError
    from distill.scorer_check import ScorerMismatch
    from serving.contracts.registry import RegistryError

    try:
        config = _load(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = _runner(config)(config)
    except (FileNotFoundError, LockedError, RegistryError, ScorerMismatch) as exc:
        print(f"error: {exc}", file=sys.stderr)  # the run report records it too
        return 2
    print(summary(report))
    return 0


def _watch(args: argparse.Namespace) -> int:
    from distill.lock import LockedError

    config = _load(args)
    run = _runner(config)
    print(f"distilling every {args.every:.0f} s once {config.min_records} new records are logged")
    while True:
        try:
            print(summary(run(config)), flush=True)
        except LockedError as exc:
            print(f"skipped: {exc}", flush=True)
        except Exception as exc:  # a failed run is reported and retried next time
            print(f"run failed: {type(exc).__name__}: {exc}", flush=True)
        time.sleep(args.every)


def add_parser(sub: argparse._SubParsersAction) -> None:
    distill = sub.add_parser("distill", help="train the next student on the escalation log")
    actions = distill.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="one run: window, train, evaluate, gate, publish")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    run.add_argument("--workers", type=int, default=None, help=">1: Ray Train TorchTrainer workers")
    run.add_argument("--min-records", type=int, default=None)
    run.set_defaults(func=_run)
    watch = actions.add_parser("watch", help="run on a schedule until stopped")
    watch.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    watch.add_argument("--every", type=parse_duration, default=parse_duration("15m"))
    watch.add_argument("--min-records", type=int, default=200)
    watch.add_argument("--workers", type=int, default=None)
    watch.set_defaults(func=_watch)
