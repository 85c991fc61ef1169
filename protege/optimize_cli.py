"""``protege optimize``: serve a student version (or the teacher) through a faster runtime,
only where it keeps the float model's decisions (see ``distill.optimize``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protege.distill_cli import DEFAULT_CONFIG


def run(args: argparse.Namespace) -> int:
    from distill.config import load_classify_config
    from distill.optimize import optimize_student, optimize_teacher
    from distill.tables import TableError, read_texts
    from serving.classify.classifier import Classifier
    from serving.contracts.registry import Registry, RegistryError

    try:
        config = load_classify_config(args.config)
        if config.traffic is None:
            raise ValueError(f"{args.config}: `traffic` is needed (the texts to compare on)")
        texts = read_texts(config.traffic)[: args.inputs]
        if args.teacher:
            trial = optimize_teacher(
                config.teacher, args.runtime, texts, args.bound, config.scores_dir
            )
        else:
            registry = Registry(config.registry, endpoint_url=config.s3_endpoint)
            version = args.version or registry.current()
            if version is None:
                raise ValueError(f"registry {registry.uri} has no current version")
            teacher = Classifier(config.teacher, device="cpu", max_tokens=config.train.max_tokens)
            trial = optimize_student(
                registry,
                version,
                args.runtime,
                texts,
                teacher,
                config.scorer,
                config.scores_dir,
                args.bound,
            )
    except (ValueError, FileNotFoundError, TableError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdict = "accepted" if trial.accepted else "refused"
    print(f"{trial.version} on {trial.runtime}: {verdict} ({trial.inputs} inputs): {trial.reason}")
    return 0 if trial.accepted else 1


def add_parser(sub: argparse._SubParsersAction) -> None:
    from distill.optimize import AGREEMENT_BOUND

    parser = sub.add_parser(
        "optimize",
        help="serve the current student (or the teacher) through ONNX Runtime, as its own "
        "version, if its decisions match and it is faster",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the distill config")
    parser.add_argument("--runtime", choices=["onnx", "onnx-int8"], default="onnx")
    parser.add_argument("--version", default=None, help="a student version (default: current)")
    parser.add_argument("--teacher", action="store_true", help="the teacher folder instead")
    parser.add_argument("--inputs", type=int, default=3000, help="traffic texts to compare on")
    parser.add_argument("--bound", type=float, default=AGREEMENT_BOUND)
    parser.set_defaults(func=run)
