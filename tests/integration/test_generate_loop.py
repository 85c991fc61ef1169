"""One round of the generative learning loop on a real local Ray Serve, on tiny random
Llamas built in the test: `protege init` on a generative task, the gateway it configures
serving chat traffic through the official `openai` client and logging it, a distillation
run judging a planted candidate (the teacher's weights: a round of training on random
models cannot be counted on to improve) and promoting it, and every replica hot-swapping
it while traffic flows, with no failed request."""

import json
import shutil
import threading
import time

import openai
import pytest
import yaml
from conftest import wait_for
from ray import serve
from tiny_lm import build_tiny_lm

from distill.config import load_distill_config
from distill.generate_config import GenerateDistillConfig
from distill.generate_job import run_generate
from protege.cli import main
from serving import local_ray
from serving.contracts.records import iter_records
from serving.contracts.registry import Registry
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import load_language_model, render_chat

pytestmark = pytest.mark.integration
APP, MODEL, MAX_NEW = "generate-loop", "loop-chat", 6
PROMPTS = [f"Write a headline about event number {i}." for i in range(48)]


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


class Traffic:
    """Chat requests in a loop from a thread, every outcome kept."""

    def __init__(self, client: openai.OpenAI) -> None:
        self.client, self.failures, self.answers = client, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                reply = self.client.chat.completions.create(model=MODEL, messages=chat(i))
                self.answers.append((time.monotonic(), reply.protege["student_version"]))
            except Exception as exc:  # every failure is the test's to report
                self.failures.append(repr(exc))
            i += 1

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("task")
    student = build_tiny_lm(root / "pair" / "student", seed=2)
    teacher = build_tiny_lm(root / "pair" / "teacher", seed=1)
    (root / "traffic.jsonl").write_text(
        "".join(json.dumps({"messages": chat(i)}) + "\n" for i in range(8))
    )
    spec = {
        "name": MODEL,
        "kind": "generate",
        "teacher": str(teacher),
        "student": str(student),
        "traffic": "traffic.jsonl",
        "workdir": "work",
        "max_new_tokens": MAX_NEW,
        "max_prompt_tokens": 64,
    }
    (root / "task.yaml").write_text(yaml.safe_dump(spec))
    assert main(["init", str(root / "task.yaml")]) == 0
    return root / "work"


@pytest.fixture(scope="module")
def client(task, serve_cluster):
    config = yaml.safe_load((task / "serve_config.yaml").read_text())
    app = config["applications"][0]
    app |= {"name": APP, "route_prefix": f"/{APP}"}
    app["args"]["generate"] |= {
        "threshold": 0.0,  # every answer kept, and logged as a sampled one: the gate's evidence
        "audit_fraction": 1.0,
        "log": {**app["args"]["generate"]["log"], "fsync_interval_s": 0.2},
    }
    app["args"] |= {"registry_poll_s": 0.5, "torch_threads": 1}
    local_ray.deploy_config({"applications": [app]}, task)
    url = f"http://127.0.0.1:{serve_cluster}/{APP}/v1"
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    client.served_app = app  # type: ignore[attr-defined]  # what the last test pins
    yield client
    serve.delete(APP)


def test_a_promoted_candidate_is_hot_swapped_with_no_failed_request(task, client):
    distill = load_distill_config(task / "distill.yaml")
    assert isinstance(distill, GenerateDistillConfig)
    registry = Registry(distill.registry)
    seed = registry.current()
    for i in range(len(PROMPTS)):  # the traffic the round learns from and is judged on
        client.chat.completions.create(model=MODEL, messages=chat(i))
    wait_for(lambda: len(list(iter_records(task / "escalations"))) >= len(PROMPTS), 30)

    config = distill.model_copy(
        update={
            "min_records": 4,
            "eval": distill.eval.model_copy(update={"share": 0.5, "min_calibration_sampled": 6}),
            "gate": distill.gate.model_copy(update={"min_sampled": 6, "min_requests": 6}),
        }
    )

    def plant_the_teacher(current, examples, staged):
        assert examples  # the round built its training pairs from the served traffic
        shutil.copytree(config.teacher, staged, ignore=shutil.ignore_patterns("protege.json"))
        return [0.0]

    with Traffic(client) as traffic:
        report = run_generate(config, trainer=plant_the_teacher)
        assert report["result"] == "promoted", report["reason"]
        promoted = report["candidate"]
        assert registry.current() == promoted != seed
        began = time.monotonic()
        wait_for(lambda: any(t > began and v == promoted for t, v in traffic.answers), 60)
    assert traffic.failures == []  # the swap failed no request
    (entry,) = client.models.list()
    assert entry.protege["student"]["version"] == promoted
    teacher = load_language_model(config.teacher, "cpu")
    (greedy,) = generate_batch(
        teacher, [render_chat(teacher.tokenizer, chat(0))], SamplingSettings(MAX_NEW)
    )
    reply = client.chat.completions.create(model=MODEL, messages=chat(0))
    assert reply.protege["tier"] == "student"
    assert reply.choices[0].message.content == greedy.text  # it answers as the teacher does


def test_the_bench_pins_the_seed_beside_a_learned_student_and_asks_it(task, client):
    """What ``protege bench --task generate`` does for its seed reference row, on the
    gateway the previous test swapped: pin the seed in place, wait until it serves, ask."""
    from protege.bench_generate import ChatClient, pin_seed, wait_for_student

    registry = Registry(load_distill_config(task / "distill.yaml").registry)
    seed = next(m.version for m in registry.versions() if m.version != registry.current())
    pinned = pin_seed({"applications": [client.served_app]}, seed, application=APP)
    local_ray.deploy_config(pinned, task)
    asking = ChatClient(str(client.base_url).removesuffix("/v1/"), "unused", MODEL, MAX_NEW, None)
    wait_for_student(asking, seed, timeout_s=120)
    row = asking.row("cascade, seed student (reference)", [chat(0), chat(1)], [], 2)
    assert [a.student_version for a in row.answers if a is not None] == [seed, seed]
    unpinned = pin_seed({"applications": [client.served_app]}, seed, application=APP)
    for deployment in unpinned["applications"][0]["deployments"]:
        if deployment["name"] == "Gateway":
            deployment["user_config"] = {}  # no pin: follow the registry's pointer again
    local_ray.deploy_config(unpinned, task)
    wait_for_student(asking, registry.current() or "", timeout_s=120)
