"""``protege``: build the default models, serve, run the demo and the benchmark.

protege models build [--cache var/cache] [--profile full|lite]
protege models build-generate [--cache var/cache] [--profile full|lite]
protege init TASK.yaml [--force]
protege serve [--config deploy/serve_config.yaml] [--port 8000]
protege keys new NAME [--overrides] [--file api-keys.yaml]
protege demo [--task classify|generate]
protege bench [--task classify|generate]
protege soak
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path

from protege import distill_cli, optimize_cli, registry_cli

DEFAULT_CACHE = Path(os.environ.get("PROTEGE_CACHE", "var/cache"))
# the pages whose generated blocks these commands write (when run from a checkout)
BENCH_DOCS, SPREAD_DOCS = "docs/benchmark.md", "docs/learning-loop.md"
GENERATE_DOCS = "docs/generation.md"
GATE_DOCS = "docs/gate.md"
DOCS_HELP = (
    "the docs page whose block {block} to write (default: {page} when it exists; '' for none)"
)


def _models_build(args: argparse.Namespace) -> int:
    from protege.bbc import MissingPackageError
    from protege.default_models import build_defaults
    from protege.init_report import print_init_report

    try:
        report = build_defaults(args.cache, args.profile, args.device)
    except MissingPackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"\nthe default task is built in {args.cache} (task file: {args.cache / 'task.yaml'})")
    print_init_report(report)
    return 0


def _models_build_generate(args: argparse.Namespace) -> int:
    from protege.bbc import MissingPackageError
    from protege.default_generate import build_generate, format_report

    try:
        report = build_generate(args.cache, args.profile, args.device)
    except MissingPackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(f"\nthe generative pair is built in {args.cache / 'generate'}")
    print(format_report(report))
    print(f"serve it:   protege serve --config {args.cache / 'generate' / 'serve_config.yaml'}")
    return 0


def _init(args: argparse.Namespace) -> int:
    from distill.prepare import prepare
    from distill.prepare_generate import prepare_generate
    from distill.tables import TableError
    from distill.task import GenerateTaskSpec, TaskError, load_task
    from protege.init_report import print_generate_init_report, print_init_report

    try:
        spec = load_task(args.task)
        if isinstance(spec, GenerateTaskSpec):
            report = prepare_generate(spec, force=args.force, device=args.device)
            print_generate_init_report(report)
            return 0
        prepared = prepare(spec, force=args.force, device=args.device)
    except (TaskError, TableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_init_report(prepared.report)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from protege.gateway_process import load_serve_config, running_gateway

    config = load_serve_config(args.config)
    stop = threading.Event()
    with running_gateway(
        config, port=args.port, metrics_port=args.metrics_port, ingress=args.ingress
    ) as url:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # after ray.init, which sets its own
        # every Gateway replica follows the registry's current pointer itself
        print(f"protege is serving at {url} (docs: {url}/docs); Ctrl-C stops it", flush=True)
        print(_access_line(config), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(0.5):
                pass
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from serving.access import new_key, write_entry

    key, entry = new_key(args.name, overrides=args.overrides)
    if args.file is None:
        print(json.dumps([entry.model_dump()]), file=sys.stderr)
        print("add the entry above to $PROTEGE_API_KEYS (a JSON list); the key:", file=sys.stderr)
    else:
        try:
            write_entry(args.file, entry)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"stored the hash of key {args.name!r} in {args.file}; the key:", file=sys.stderr)
    print(key)  # shown once, never stored: give it to the client
    return 0


def _access_line(config: dict) -> str:
    from serving.access import gatekeeper
    from serving.config import AccessConfig

    access = AccessConfig.model_validate(
        config["applications"][0].get("args", {}).get("access", {})
    )
    return gatekeeper(access).describe()


def _demo(args: argparse.Namespace) -> int:
    if args.task == "generate":
        return _demo_generate(args)
    from protege.demo import run_demo

    if args.docs is not None:
        print("error: --docs is the generative demo's (--task generate)", file=sys.stderr)
        return 2
    run_demo(
        args.cache,
        args.config or Path("deploy/serve_config.yaml"),
        args.rounds,
        args.chunk or 1000,
        args.concurrency,
        args.port,
        args.out or Path("var/demo"),
        args.seed,
        args.metrics_port,
    )
    return 0


def _demo_generate(args: argparse.Namespace) -> int:
    if args.config is not None:
        print("error: --config is the classification demo's (--task classify)", file=sys.stderr)
        return 2
    from protege.demo_generate import DemoSettings, run_generate_demo

    demo = DemoSettings(rounds=args.rounds, concurrency=args.concurrency)
    if args.chunk:
        demo = dataclasses.replace(demo, per_round=args.chunk)
    try:  # checked before the run, which takes most of an hour
        page = _docs_target(args.docs, GENERATE_DOCS, "demo-generate")
    except ValueError as exc:
        return _docs_error(exc)
    out = args.out or Path("var/demo-generate")
    results = run_generate_demo(args.cache, out, demo, args.seed, args.port, args.metrics_port)
    if page is not None:
        write_demo_docs(results, out / "learning_curve.png", page)
    return 0


def write_demo_docs(results: dict, curve: Path, page: Path) -> None:
    """The generative demo's results into ``page`` (block ``demo-generate``) and its
    learning curve beside it."""
    import shutil

    from protege.demo_generate_report import markdown
    from protege.docs_block import replace_block

    picture = page.parent / "demo-generate-curve.png"
    shutil.copyfile(curve, picture)
    replace_block(page, "demo-generate", markdown(results, picture.name))
    print(f"written: the results into {page} (block demo-generate) and {picture}")


def _demo_spread(args: argparse.Namespace) -> int:
    from protege import demo_generate_report, demo_report
    from protege.docs_block import replace_block

    kinds = {  # a generative demo's summary has its teacher's ROUGE-L
        "teacher_rouge_l_gold" in json.loads((run / "demo.json").read_text())["summary"]
        for run in args.runs
    }
    if len(kinds) > 1:
        print("error: these runs mix classification and generative demos", file=sys.stderr)
        return 2
    generative = kinds.pop()
    spread = demo_generate_report.spread if generative else demo_report.spread
    block, default = (
        ("demo-generate-spread", GENERATE_DOCS) if generative else ("demo-spread", SPREAD_DOCS)
    )
    try:
        page = _docs_target(args.docs, default, block)
    except ValueError as exc:
        return _docs_error(exc)
    table = spread(args.runs)
    print(table)
    if page is not None:
        replace_block(page, block, table)
        print(f"written: the table into {page} (block {block})")
    return 0


def _gate_curve(args: argparse.Namespace) -> int:
    from protege import gate_simulation
    from serving.contracts import defaults

    try:
        page = _docs_target(args.docs, GATE_DOCS, "gate-curve")
    except ValueError as exc:
        return _docs_error(exc)
    fraction = defaults.AUDIT_FRACTION if args.audit_fraction is None else args.audit_fraction
    print(gate_simulation.main(fraction, args.seeds, args.out, page))
    return 0


def _docs_target(option: str | None, default: str, block: str) -> Path | None:
    """The docs page a command writes ``block`` into (None: no page), checked: a page
    without the block's markers is a ValueError naming them."""
    from protege.docs_block import check_block, docs_page

    page = docs_page(option, default)
    if page is not None:
        check_block(page, block)
    return page


def _docs_error(exc: ValueError) -> int:
    print(f"error: {exc} (--docs '' writes no page)", file=sys.stderr)
    return 2


def _bench(args: argparse.Namespace) -> int:
    if args.task == "generate":
        return _bench_generate(args)
    from protege.bench import run_bench
    from protege.bench_report import markdown
    from protege.docs_block import replace_block

    try:  # checked before the run, which takes minutes
        page = _docs_target(args.docs, BENCH_DOCS, "bench")
    except ValueError as exc:
        return _docs_error(exc)
    report = run_bench(
        args.cache,
        args.config or Path("deploy/serve_config.yaml"),
        args.requests or 600,
        args.concurrency or 16,
        args.out or Path("bench-results"),
        args.ingress or "both",
        args.registry,
    )
    print(json.dumps(report["summary"], indent=1))
    if page is not None:
        replace_block(page, "bench", markdown(report))
        print(f"written: the table into {page} (block bench)")
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from protege.bench_generate import run_generate_bench
    from protege.bench_generate_report import draft_markdown, markdown
    from protege.docs_block import check_block, replace_block

    if args.ingress == "both":
        print("error: --task generate measures one ingress: proxy or haproxy", file=sys.stderr)
        return 2
    try:  # checked before the run, which takes minutes
        page = _docs_target(args.docs, GENERATE_DOCS, "bench-generate")
        if page is not None:
            check_block(page, "draft-reuse")
    except ValueError as exc:
        return _docs_error(exc)
    report = run_generate_bench(
        args.cache,
        args.requests or 60,
        args.concurrency or 8,
        args.out or Path("bench-results/generate"),
        args.config,
        args.ingress or "proxy",
        args.registry,
    )
    print(json.dumps(report["summary"], indent=1))
    if page is not None:
        replace_block(page, "bench-generate", markdown(report))
        replace_block(page, "draft-reuse", draft_markdown(report["draft_reuse"]))
        print(f"written: the tables into {page} (blocks bench-generate and draft-reuse)")
    return 0


def _soak(args: argparse.Namespace) -> int:
    from distill.tables import TableError, read_texts
    from protege.soak import run_soak

    try:
        texts = read_texts(args.texts) if args.texts else _default_texts(args.cache)
    except (TableError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_soak(
        args.config,
        None if args.texts else args.cache,
        texts,
        args.out,
        steps=[int(s) for s in args.steps.split(",")],
        step_s=args.step_seconds,
        hold_s=args.hold_seconds,
        hold_fraction=args.fraction,
        port=args.port,
        metrics_port=args.metrics_port,
    )
    return 0


def _default_texts(cache: Path) -> list[str]:
    from protege import bbc
    from protege.default_models import build_defaults

    build_defaults(cache)
    pool = bbc.read_split(cache / "data", "holdout") + bbc.read_split(cache / "data", "stream")
    return [e.text for e in pool]


def _k8s_generate(args: argparse.Namespace) -> int:
    from protege.k8s_gen import GenerateError, generate

    try:
        stale = generate(Path.cwd(), check=args.check, storage=args.storage)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check and stale:
        print(f"out of date (run `protege k8s generate`): {', '.join(stale)}", file=sys.stderr)
        return 1
    print("k8s/base/generated is up to date" if not stale else f"wrote {', '.join(stale)}")
    return 0


def _bench_loop(args: argparse.Namespace) -> int:
    from protege.bench_loop import run_bench_loop

    run_bench_loop(args.cache, args.config, args.out, args.examples, args.seconds)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="protege", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = root.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="the embedded default models").add_subparsers(
        dest="action", required=True
    )
    build = models.add_parser(
        "build", help="build data, teacher and seed student into the cache (once)"
    )
    build.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    build.add_argument("--profile", choices=["full", "lite"], default="full")
    build.add_argument("--device", default="auto", help="auto, cpu or cuda")
    build.set_defaults(func=_models_build)
    build_gen = models.add_parser(
        "build-generate",
        help="build the generative pair (SmolLM2 teacher, layer-pruned student) into "
        "CACHE/generate (once)",
    )
    build_gen.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    build_gen.add_argument("--profile", choices=["full", "lite"], default="full")
    build_gen.add_argument("--device", default="auto", help="auto, cpu or cuda")
    build_gen.set_defaults(func=_models_build_generate)

    init = sub.add_parser(
        "init", help="check a task's teacher/student pair, calibrate the seed, make it servable"
    )
    init.add_argument("task", type=Path, help="task definition (YAML)")
    init.add_argument("--force", action="store_true", help="make the seed current again")
    init.add_argument("--device", default="auto", help="auto, cpu or cuda")
    init.set_defaults(func=_init)

    serve = sub.add_parser("serve", help="serve the gateway on 127.0.0.1 until Ctrl-C")
    serve.add_argument("--config", type=Path, default=Path("deploy/serve_config.yaml"))
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--metrics-port", type=int, default=8080)
    serve.add_argument("--ingress", choices=["proxy", "haproxy"], default="proxy")
    serve.set_defaults(func=_serve)

    soak = sub.add_parser(
        "soak", help="ramp to the saturation throughput, then hold 70%% of it (latency, RSS)"
    )
    soak.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    soak.add_argument("--config", type=Path, default=Path("deploy/serve_config.yaml"))
    soak.add_argument(
        "--texts", type=Path, help="a JSONL/CSV/Parquet file with a text column (default: BBC)"
    )
    soak.add_argument("--steps", default="2,4,8,16,32,64", help="client counts of the ramp")
    soak.add_argument("--step-seconds", type=float, default=20.0)
    soak.add_argument("--hold-seconds", type=float, default=600.0)
    soak.add_argument("--fraction", type=float, default=0.7, help="of the saturation rate")
    soak.add_argument("--port", type=int, default=8030)
    soak.add_argument("--metrics-port", type=int, default=8083)
    soak.add_argument("--out", type=Path, default=Path("bench-results/soak"))
    soak.set_defaults(func=_soak)

    k8s = sub.add_parser("k8s", help="the Kubernetes manifests").add_subparsers(
        dest="action", required=True
    )
    gen = k8s.add_parser("generate", help="k8s/base/generated/ from deploy/ and k8s/templates/")
    gen.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    gen.add_argument(
        "--storage",
        default="s3://protege",
        help="the object store for the registry and the shipped log (s3://bucket/prefix)",
    )
    gen.set_defaults(func=_k8s_generate)

    keys = sub.add_parser("keys", help="API keys for the gateway").add_subparsers(
        dest="action", required=True
    )
    new = keys.add_parser("new", help="make a key; print it once, store only its hash")
    new.add_argument("name", help="who holds it (shown in logs)")
    new.add_argument(
        "--overrides", action="store_true", help="allow force_tier and threshold per request"
    )
    new.add_argument(
        "--file", type=Path, help="key file to add it to (access.keys_file); else print the entry"
    )
    new.set_defaults(func=_keys_new)

    demo = sub.add_parser("demo", help="the learning loop: serve, distil, gate, hot-swap, repeat")
    demo.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    demo.add_argument("--config", type=Path, help="serve config (deploy/serve_config.yaml)")
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument(
        "--task",
        choices=("classify", "generate"),
        default="classify",
        help="classify: the BBC topic task; generate: the generative pair (make demo-generate)",
    )
    demo.add_argument(
        "--chunk", type=int, help="stream inputs served per round (1000; 200 for generate)"
    )
    demo.add_argument("--seed", type=int, default=0, help="stream order and training seed")
    demo.add_argument("--metrics-port", type=int, default=8080)
    demo.add_argument("--concurrency", type=int, default=8)
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument(
        "--out", type=Path, help="where results go (var/demo; var/demo-generate for generate)"
    )
    demo.add_argument(
        "--docs",
        help=DOCS_HELP.format(block="demo-generate", page=GENERATE_DOCS) + " (--task generate)",
    )
    demo.set_defaults(func=_demo)

    spread = sub.add_parser(
        "demo-spread", help="several demo runs (--seed, --out) side by side, with their range"
    )
    spread.add_argument("runs", type=Path, nargs="+", help="the demos' --out folders")
    spread.add_argument("--docs", help=DOCS_HELP.format(block="demo-spread", page=SPREAD_DOCS))
    spread.set_defaults(func=_demo_spread)

    curve = sub.add_parser(
        "gate-curve",
        help="how often the promotion gate promotes, against the true gain, on simulated logs "
        "(minutes)",
    )
    curve.add_argument("--audit-fraction", type=float, default=None, help="default: serving's")
    curve.add_argument("--seeds", type=int, default=200, help="simulated runs per cell")
    curve.add_argument("--out", type=Path, default=Path("bench-results/gate-curve.json"))
    curve.add_argument("--docs", help=DOCS_HELP.format(block="gate-curve", page=GATE_DOCS))
    curve.set_defaults(func=_gate_curve)

    bench = sub.add_parser(
        "bench",
        help="the learned student, the cascade and the teacher served, against the models' "
        "own in-process cost, side by side",
    )
    bench.add_argument(
        "--task",
        choices=["classify", "generate"],
        default="classify",
        help="which cascade: classify (the default pair) or generate (the generative pair "
        "of `protege models build-generate`)",
    )
    bench.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    bench.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="whose current student to measure (classify: default var/demo/registry after "
        "`make demo`, else the cache's registry, which holds only the seed; generate: "
        "default the config's generate.registry)",
    )
    bench.add_argument(
        "--config",
        type=Path,
        default=None,
        help="serve config (classify: default deploy/serve_config.yaml; generate: default "
        "CACHE/generate/serve_config.yaml, its generate section only)",
    )
    bench.add_argument(
        "--requests", type=int, default=None, help="per row (default 600; generate: 60)"
    )
    bench.add_argument(
        "--concurrency", type=int, default=None, help="clients (default 16; generate: 8)"
    )
    bench.add_argument(
        "--ingress",
        choices=["proxy", "haproxy", "both"],
        default=None,
        help="default both (generate: proxy)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default bench-results (generate: bench-results/generate)",
    )
    bench.add_argument(
        "--docs",
        help=DOCS_HELP.format(block="bench", page=BENCH_DOCS)
        + f"; generate: blocks bench-generate and draft-reuse of {GENERATE_DOCS}",
    )
    bench.set_defaults(func=_bench)

    loop = sub.add_parser(
        "bench-loop", help="distillation throughput (1 vs 2 workers), latency during swaps"
    )
    loop.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    loop.add_argument("--config", type=Path, default=Path("deploy/serve_config.yaml"))
    loop.add_argument("--examples", type=int, default=512)
    loop.add_argument("--seconds", type=float, default=20.0)
    loop.add_argument("--out", type=Path, default=Path("bench-results"))
    loop.set_defaults(func=_bench_loop)

    distill_cli.add_parser(sub)
    optimize_cli.add_parser(sub)
    registry_cli.add_parser(sub)
    return root


QUIET = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # transformers' per-load reports (heads that are meant to be new) and load bars are
    # noise on a terminal; protege prints its own progress and tables
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def main(argv: list[str] | None = None) -> int:
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    args = parser().parse_args(argv)
    return int(registry_cli.guarded(args.func)(args))


if __name__ == "__main__":
    sys.exit(main())
