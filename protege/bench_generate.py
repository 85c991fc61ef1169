"""``protege bench --task generate``: what serving the generative cascade costs against what
its models cost in process, side by side in one run, on held-out gold prompts.

Rows, in order:

- in process (the limits, one torch thread as each replica has): the student and the
  teacher alone in static batches of 1 and 8; the cascade itself (the generation service
  over the in-process teacher engine) with and without draft reuse;
- the draft-reuse table: the teacher engine with its own answer as the draft, half of it
  accepted, none of it (:mod:`protege.bench_draft`);
- served on one Ray Serve instance holding three applications: the cascade (``/``: with
  ``force_tier: student`` it is the student alone), the cascade with ``draft_reuse:
  false`` (``/no-draft``) and the teacher served alone (``/teacher-alone``: the same
  gateway with the teacher in the student's place, threshold 0, no audit, no registry),
  asked through the official ``openai`` client, streaming, by concurrent clients, after
  a warm-up on prompts outside the bench;
- when the registry's current student is a learned one (not the configured seed), the
  seed's cascade as a reference row: the seed pinned in place (``user_config``), served.

Writes ``bench.json`` and ``bench.md`` into ``--out`` and prints the tables; the CLI
writes them into docs/generation.md (blocks ``bench-generate`` and ``draft-reuse``).
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from protege.bench_draft import measure_draft_reuse
from protege.bench_generate_inprocess import (
    Answer,
    Measured,
    ask_all,
    cascade_row,
    model_rows,
)
from protege.bench_generate_report import (
    CASCADE,
    CASCADE_NO_DRAFT,
    CASCADE_SEED,
    SERVED,
    STUDENT_ALONE,
    TEACHER_ALONE,
    draft_markdown,
    markdown,
    row_figures,
    set_limits,
    summary,
)
from protege.gateway_process import running_gateway
from protege.headline_task import read_prompts
from serving import local_ray
from serving.access import steering_key
from serving.client import ProtegeClient
from serving.config import GatewayConfig
from serving.contracts.manifest import read_manifest, weights_digest
from serving.contracts.registry import Registry
from serving.generate.config import DEFAULT_NAME, GenerateCascadeConfig, LanguageModelSpec
from serving.generate.models import Message, load_language_model
from serving.generate.student import load_student

BENCH_PORT, METRICS_PORT = 8210, 8291
NO_DRAFT, ALONE = "/no-draft", "/teacher-alone"
CPUS_PER_REPLICA = 0.25  # six replicas (three gateways, three teachers) on 2 cores
SHARED_ARGS = ("limits", "device", "s3_endpoint", "registry_poll_s", "teacher_unready_after_s")
DRAFT_PROMPTS, DRAFT_RUNS = 3, 3


def generate_section(config_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``generate`` section of a serve config and the settings every cascade of its
    gateway shares (the classification parts are left out)."""
    if not config_path.exists():
        raise SystemExit(
            f"error: {config_path} not found: build the generative pair with `protege models "
            "build-generate` (it writes CACHE/generate/serve_config.yaml), or pass --config"
        )
    args = yaml.safe_load(config_path.read_text())["applications"][0].get("args", {})
    if "generate" not in args:
        raise SystemExit(f"error: {config_path} hosts no generative cascade (no `generate:`)")
    return dict(args["generate"]), {k: args[k] for k in SHARED_ARGS if k in args}


def served_config(
    section: dict[str, Any], shared: dict[str, Any], out: Path, keys_file: Path
) -> dict[str, Any]:
    """Three gateways on one Serve instance: the cascade, the cascade without draft
    reuse, and the teacher served alone (in the student's place, never escalating,
    logging nothing). Each is validated here, before anything runs."""
    cascade = {**section, "audit_fraction": 0.0, "log": {"dir": str(out / "logs" / "cascade")}}
    no_draft = {**cascade, "draft_reuse": False, "log": {"dir": str(out / "logs" / "no-draft")}}
    alone = {
        key: value
        for key, value in cascade.items()
        if key not in ("target_agreement", "target_escalation_rate", "registry")
    }
    alone |= {
        "student": {"path": str(section["teacher"]["path"])},
        "threshold": 0.0,  # confidence >= 0: never escalates
        "log": {"dir": str(out / "logs" / "teacher-alone")},
    }
    replicas = [
        {"name": name, "num_replicas": 1, "ray_actor_options": {"num_cpus": CPUS_PER_REPLICA}}
        for name in ("Gateway", "GenerativeTeacher")
    ]
    applications = []
    for name, prefix, generate in (
        ("cascade", "/", cascade),
        ("no-draft", NO_DRAFT, no_draft),
        ("teacher-alone", ALONE, alone),
    ):
        args = {
            **shared,
            "access": {"keys_file": str(keys_file)},
            "torch_threads": 1,
            "generate": generate,
        }
        GatewayConfig.model_validate(args)
        applications.append(
            {
                "name": name,
                "route_prefix": prefix,
                "import_path": "serving.app:build_app",
                "args": args,
                "deployments": [dict(r) for r in replicas],
            }
        )
    return {"applications": applications}


def current_student(config: GenerateCascadeConfig) -> Path:
    """The folder the served cascade starts from: its registry's current version, else
    the configured student."""
    if config.registry is not None:
        registry = Registry(config.registry, config.registry_cache_dir)
        current = registry.current()
        if current:
            return registry.path(current)
    return config.student.path


def local_teacher(config: GenerateCascadeConfig) -> Path:
    """The teacher's folder; a remote teacher has no in-process limit to measure here."""
    if not isinstance(config.teacher, LanguageModelSpec):
        raise SystemExit(
            "error: the bench measures a teacher in a local folder (its in-process limit and "
            "draft reuse); this config's teacher is a remote server: point generate.teacher "
            "at a folder, or pass --config"
        )
    return config.teacher.path


def seed_reference(config: GenerateCascadeConfig, current: str) -> tuple[str, bool]:
    """The seed (the configured student folder's version) and whether the registry's
    current student is another, learned one: then the seed's cascade is measured served
    beside it as a reference (the seed must be in the registry to be pinned)."""
    seed = model_version(config.student.path)
    if current == seed or config.registry is None:
        print(f"!! measuring the seed student {seed}: no learned version is current")
        return seed, False
    registry = Registry(config.registry, config.registry_cache_dir)
    if seed not in {m.version for m in registry.versions()}:
        print(f"!! the seed {seed} is not in {registry.uri}: no reference row")
        return seed, False
    print(f"measuring the learned student {current} (seed {seed} as reference)")
    return seed, True


def pin_seed(config: dict[str, Any], seed: str, application: str = "cascade") -> dict[str, Any]:
    """The served config with ``application``'s Gateway pinned to ``seed``."""
    pinned = copy.deepcopy(config)
    for app in pinned["applications"]:
        if app["name"] == application:
            gateway = next(d for d in app["deployments"] if d["name"] == "Gateway")
            gateway["user_config"] = {"generate": {"student_version": seed}}
    return pinned


def wait_for_student(client: ChatClient, version: str, timeout_s: float = 300) -> None:
    """Until the gateway's cascade serves ``version`` (a swap or a pin has landed); a
    TimeoutError naming what it serves instead, and the swap's last error, after
    ``timeout_s`` (a failed call is retried until then)."""
    from openai import OpenAI, OpenAIError

    models = OpenAI(base_url=f"{client.base}/v1", api_key=client.key, max_retries=0, timeout=10)
    deadline = time.monotonic() + timeout_s
    seen: dict[str, Any] = {}
    while True:
        try:
            entries = [m for m in models.models.list() if m.id == client.model]
            seen = (getattr(entries[0], "protege", None) or {}) if entries else {}
        except OpenAIError as exc:
            seen = {"error": repr(exc)}
        if seen.get("student", {}).get("version") == version:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the gateway did not serve {version} within {timeout_s} s (it serves "
                f"{seen.get('student', {}).get('version')}; last report: "
                f"{seen.get('swap') or seen.get('error') or 'none'})"
            )
        time.sleep(0.5)


def same_target(section: dict[str, Any]) -> dict[str, Any]:
    """The cascade section with the current version's stored target made explicit, when
    it names none: the seed (reference row) then derives its threshold for the same target
    as the learned student, not for the one stored with it."""
    rules = ("threshold", "target_agreement", "target_escalation_rate")
    if any(section.get(k) is not None for k in rules):
        return section
    manifest = read_manifest(current_student(GenerateCascadeConfig.model_validate(section)))
    target = manifest.default_target if manifest else None
    if target is None:
        return section
    return section | {
        "target_agreement": target.target_agreement,
        "target_escalation_rate": target.target_escalation_rate,
    }


def model_version(folder: Path) -> str:
    manifest = read_manifest(folder)
    return manifest.version if manifest else weights_digest(folder)


def run_generate_bench(
    cache: Path,
    requests: int,
    concurrency: int,
    out: Path,
    config_path: Path | None = None,
    ingress: local_ray.Ingress = "proxy",
    registry: Path | None = None,
) -> dict[str, Any]:
    began, load_before = time.perf_counter(), os.getloadavg()
    root = cache / "generate"
    section, shared = generate_section(config_path or root / "serve_config.yaml")
    if registry is not None:
        section["registry"] = str(registry)
    section = same_target(section)
    prompts = read_prompts(root / "data" / "gold.jsonl")
    if len(prompts) < requests + concurrency:
        raise SystemExit(
            f"error: {len(prompts)} gold prompts; the bench needs {requests} and "
            f"{concurrency} more to warm up: lower --requests"
        )
    bench, warm = prompts[:requests], prompts[requests : requests + concurrency]
    messages: list[Sequence[Message]] = [p["messages"] for p in bench]  # type: ignore[misc]
    warm_messages: list[Sequence[Message]] = [p["messages"] for p in warm]  # type: ignore[misc]
    gold = [str(p["reference"]) for p in bench]

    torch.set_num_threads(1)  # as each replica has (torch_threads: 1)
    out.mkdir(parents=True, exist_ok=True)
    teacher_folder = local_teacher(GenerateCascadeConfig.model_validate(section))
    key, keys_file = steering_key(out.resolve())
    serve = served_config(section, shared, out.resolve(), keys_file)
    config = GenerateCascadeConfig.model_validate(serve["applications"][0]["args"]["generate"])
    device = shared.get("device", "auto")
    active = load_student(current_student(config), config, device)
    student = active.model
    seed, learned = seed_reference(config, student.version)
    teacher = load_language_model(teacher_folder, device=device)
    setting = {
        "requests": requests,
        "concurrency": concurrency,
        "max_new_tokens": student.max_new_tokens,
        "student": student.version,
        "seed": seed,
        "learned": learned,
        "teacher": model_version(teacher_folder),
        "threshold": active.rule.value,
        "threshold_rule": active.rule.description,
        "agreement_cut": config.agreement_cut,
        "ingress": ingress,
        "threads_per_replica": 1,
    }
    max_new, teacher_version = student.max_new_tokens, setting["teacher"]
    print(f"bench: {json.dumps(setting)}", flush=True)

    measured = _progress(model_rows(student.lm, "student", messages, max_new))
    measured += _progress(model_rows(teacher, "teacher", messages, max_new))
    no_draft = config.model_copy(update={"draft_reuse": False})
    for name, cascade in ((CASCADE, config), (CASCADE_NO_DRAFT, no_draft)):
        row = cascade_row(
            name,
            cascade,
            active,
            teacher,
            teacher_version,
            messages,
            max_new,
            concurrency,
            warm_messages,
        )
        measured += _progress([row])
    print("draft reuse on the teacher engine ...", flush=True)
    draft = measure_draft_reuse(
        teacher, teacher_version, messages[:DRAFT_PROMPTS], max_new, DRAFT_RUNS
    )
    print(draft_markdown(draft), flush=True)
    del active, student, teacher  # the served replicas load their own
    gc.collect()

    stack_began = time.perf_counter()
    with running_gateway(serve, port=BENCH_PORT, metrics_port=METRICS_PORT, ingress=ingress) as url:
        for prefix in (NO_DRAFT, ALONE):
            with ProtegeClient(url + prefix) as client:
                client.wait_ready(300)
        model = str(section.get("name", DEFAULT_NAME))
        plan: list[tuple[str, str, dict[str, Any] | None]] = [
            (STUDENT_ALONE, url, {"protege": {"force_tier": "student"}}),
            (TEACHER_ALONE, url + ALONE, None),
            (CASCADE, url, None),
            (CASCADE_NO_DRAFT, url + NO_DRAFT, None),
        ]
        for name, base, extra in plan:
            asking = ChatClient(base, key, model, max_new, extra)
            measured += _progress([asking.row(name, messages, warm_messages, concurrency)])
        if learned:  # pin the seed in place (a user_config update), then measure it
            local_ray.deploy_config(pin_seed(serve, seed), Path.cwd())
            asking = ChatClient(url, key, model, max_new, None)
            wait_for_student(asking, seed)
            measured += _progress([asking.row(CASCADE_SEED, messages, warm_messages, concurrency)])
    print(f"Serve: up, measured and shut down in {time.perf_counter() - stack_began:.0f} s")

    reference = next((m for m in measured if (m.name, m.stack) == (TEACHER_ALONE, SERVED)), None)
    teacher_texts = [a.text if a else None for a in reference.answers] if reference else None
    rows = set_limits([row_figures(m, gold, teacher_texts, config.agreement_cut) for m in measured])
    setting["load_average"] = [round(load_before[0], 1), round(os.getloadavg()[0], 1)]
    report = {
        "description": _description(setting),
        **setting,
        "rows": rows,
        "summary": summary(rows),
        "draft_reuse": draft,
        "machine": {"cpus": os.cpu_count(), "cuda": torch.cuda.is_available()},
        "seconds": round(time.perf_counter() - began, 1),
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(report) + "\n" + draft_markdown(draft))
    print("\n" + markdown(report))
    return report


def _progress(rows: list[Measured]) -> list[Measured]:
    for m in rows:
        ok = sum(a is not None for a in m.answers)
        print(
            f"  {m.name} ({m.stack}): {ok} of {len(m.answers)} answered in {m.seconds:.1f} s, "
            f"{ok / max(m.seconds, 1e-9):.2f} req/s",
            flush=True,
        )
    return rows


def _description(s: dict[str, Any]) -> str:
    return (
        f"{s['requests']} held-out gold prompts (BBC article openings the models never "
        f"trained on, `data/gold.jsonl`) from {s['concurrency']} concurrent clients, greedy, "
        f"at most {s['max_new_tokens']} new tokens. Student `{s['student']}` at threshold "
        f"{s['threshold']:.3f} ({s['threshold_rule']}), teacher `{s['teacher']}`. One torch "
        f"thread per replica and in process; Ray Serve's {s['ingress']} ingress, the "
        "official `openai` client, streaming (the first byte is the first chunk). ROUGE-L "
        "teacher: against the teacher served alone's answers to the same prompts; agrees: "
        f"ROUGE-L at least {s['agreement_cut']}. Limit: the in-process row each served row "
        "is set against (a model alone: its batch-8 rate; the cascade: itself in process). "
        f"{os.cpu_count()} CPUs, shared: load average {s['load_average'][0]} at the start, "
        f"{s['load_average'][1]} at the end."
    )


class ChatClient:
    """One served row's client: the official ``openai`` client, streaming chats."""

    def __init__(
        self, base: str, key: str, model: str, max_tokens: int, extra: dict[str, Any] | None
    ) -> None:
        self.base, self.key, self.model = base, key, model
        self.max_tokens, self.extra = max_tokens, extra

    def row(
        self,
        name: str,
        messages: Sequence[Sequence[Message]],
        warm: Sequence[Sequence[Message]],
        concurrency: int,
    ) -> Measured:
        """A warm-up on ``warm``, then ``messages``, ``concurrency`` at a time."""
        from openai import AsyncOpenAI

        async def run() -> Measured:
            client = AsyncOpenAI(
                base_url=f"{self.base}/v1", api_key=self.key, max_retries=0, timeout=120.0
            )
            try:
                await ask_all(lambda m: self.chat(client, m), warm, concurrency)
                began = time.perf_counter()
                answers = await ask_all(lambda m: self.chat(client, m), messages, concurrency)
                return Measured(name, SERVED, answers, time.perf_counter() - began)
            finally:
                await client.close()

        return asyncio.run(run())

    async def chat(self, client: Any, messages: Sequence[Message]) -> Answer:
        """One streamed chat: its text, first byte, usage and ``protege`` metadata (the
        last chunks carry the end-only fields)."""
        began = time.perf_counter()
        stream = await client.chat.completions.create(
            model=self.model,
            messages=[dict(m) for m in messages],
            max_tokens=self.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=self.extra,
        )
        texts: list[str] = []
        first_byte: float | None = None
        meta: dict[str, Any] = {}
        usage = None
        async for chunk in stream:
            if first_byte is None:
                first_byte = time.perf_counter() - began
            meta.update(getattr(chunk, "protege", None) or {})
            if chunk.choices:
                texts.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        if usage is None or "tier" not in meta:
            raise RuntimeError("the stream ended without its usage or its protege metadata")
        return Answer(
            text="".join(texts),
            completion_tokens=usage.completion_tokens,
            latency_s=time.perf_counter() - began,
            first_byte_s=first_byte,
            tier=meta["tier"],
            escalated=bool(meta["escalated"]),
            draft=meta.get("draft"),
            accepted_share=meta.get("accepted_draft_share"),
            teacher_seconds=meta.get("teacher_seconds"),
            teacher_seconds_saved=meta.get("teacher_seconds_saved"),
            student_version=meta.get("student_version"),
        )
