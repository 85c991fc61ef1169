"""``protege registry list | show VERSION | promote VERSION | rollback | import FOLDER``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from serving.contracts.registry import ANY, Registry, RegistryError
from serving.contracts.storage import StorageError

DEFAULT_REGISTRY = "var/cache/registry"


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _list(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    current = registry.current()
    rows = []
    for m in registry.versions():
        rows.append(
            [
                "*" if m.version == current else "",
                m.version,
                m.parent or "-",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created_at)),
                f"{m.eval['escalation_rate']:.1%}" if "escalation_rate" in m.eval else "-",
                f"{m.eval['cascade_agreement']:.1%}" if "cascade_agreement" in m.eval else "-",
                # where its threshold was calibrated: live traffic or the traffic sample
                m.calibration.kind if m.calibration else "-",
            ]
        )
    if not rows:
        print(f"registry {registry.uri} is empty: `protege registry import FOLDER --promote`")
        return 0
    print(
        _table(
            rows,
            [
                "",
                "version",
                "parent",
                "created",
                "escalation",
                "cascade agreement",
                "calibrated on",
            ],
        )
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    manifest = Registry(args.registry).manifest(args.version)
    shown = manifest.model_dump(exclude={"calibration"})
    if manifest.calibration:
        shown["calibration"] = {
            "source": manifest.calibration.source,
            "inputs": len(manifest.calibration.agrees_with_teacher),
        }
    print(json.dumps(shown, indent=1))
    return 0


def _promote(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    registry.promote(args.version, expected=args.expected)
    print(f"current -> {args.version}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    print(f"current -> {Registry(args.registry).rollback(expected=args.expected)}")
    return 0


def _import(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    version = registry.import_folder(args.folder)
    if args.promote:
        registry.promote(version)
    print(f"imported {version}" + (" and made it current" if args.promote else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    registry = sub.add_parser("registry", help="student versions and the current pointer")
    registry.add_argument(
        "--registry",
        default=DEFAULT_REGISTRY,
        help="a folder or s3://bucket/prefix (endpoint: $AWS_ENDPOINT_URL)",
    )
    actions = registry.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="versions, newest last; * marks current").set_defaults(
        func=_list
    )
    show = actions.add_parser("show", help="one version's manifest")
    show.add_argument("version")
    show.set_defaults(func=_show)
    expected = {
        "default": ANY,
        "metavar": "VERSION",
        "help": "only if the current version is still VERSION (compare-and-set)",
    }
    promote = actions.add_parser("promote", help="make VERSION current")
    promote.add_argument("version")
    promote.add_argument("--expected", **expected)
    promote.set_defaults(func=_promote)
    rollback = actions.add_parser("rollback", help="back to the previous current")
    rollback.add_argument("--expected", **expected)
    rollback.set_defaults(func=_rollback)
    imp = actions.add_parser("import", help="add a model folder with a protege.json")
    imp.add_argument("folder", type=Path)
    imp.add_argument("--promote", action="store_true")
    imp.set_defaults(func=_import)


def guarded(func):
    """Registry errors print their message and exit 2 instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except (RegistryError, StorageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run
