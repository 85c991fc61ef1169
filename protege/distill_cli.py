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


def summary(report: dict[str, Any]) -> str:
    lines = [f"run {report.get('run_id', '?')}: {report['result']} - {report['reason']}"]
    if "eval" in report:
        cur, cand = report["eval"]["current"], report["eval"]["candidate"]
        lines.append(f"{'':22}{'current':>14}{'candidate':>14}")
        for key in (
            "escalation_rate",
            "cascade_accuracy",
            "cascade_agreement",
            "gold_accuracy",
            "teacher_agreement",
            "threshold",
        ):
            lines.append(f"{key:22}{cur[key]:>14.4f}{cand[key]:>14.4f}")
    if "window" in report:
        lines.append("window: " + ", ".join(f"{k}={v}" for k, v in report["window"].items()))
    return "\n".join(lines)


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


def _run(args: argparse.Namespace) -> int:
    from distill.job import run
    from distill.lock import LockedError
    from serving.registry import RegistryError

    try:
        config = _load(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run(config)
    except (FileNotFoundError, LockedError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # the run report records it too
        return 2
    print(summary(report))
    return 0


def _watch(args: argparse.Namespace) -> int:
    from distill.job import run
    from distill.lock import LockedError

    config = _load(args)
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
