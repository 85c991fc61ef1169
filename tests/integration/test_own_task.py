"""The whole loop on a task that is not BBC: three ticket classes, tiny models trained in
the test, generated texts. `protege init`, serving with offline audits, a distillation run
judged on the live traffic the gateway logged, the gate, and a hot swap."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import app_config, wait_for
from ticket_task import LABELS, build_ticket_task, tickets

from distill.config import DistillConfig
from distill.job import run
from protege.cli import main
from protege.traffic import send
from serving import local_ray
from serving.client import ProtegeClient
from serving.contracts.records import iter_records
from serving.contracts.registry import Registry

pytestmark = pytest.mark.integration


def served_escalation(url: str, texts: list[str]) -> float:
    run_ = send(url, texts, concurrency=4, batch=8)
    assert run_.failures == 0
    outputs = [o for o in run_.outputs if o is not None]
    assert len(outputs) == len(texts)
    return sum(o.escalated for o in outputs) / len(outputs)


def test_init_serve_distil_gate_and_swap_on_a_three_label_task(serve_cluster, tmp_path):
    task = build_ticket_task(tmp_path)
    assert main(["init", str(task)]) == 0
    work = tmp_path / "work"
    registry = Registry(work / "registry")
    seed = registry.current()
    assert seed is not None and registry.manifest(seed).labels == LABELS

    serve_config = yaml.safe_load((work / "serve_config.yaml").read_text())
    args = serve_config["applications"][0]["args"]
    assert args["cascade"]["audit_fraction"] == 0.5
    args.update(log={"dir": args["log"]["dir"], "fsync_interval_s": 0.2}, torch_threads=1)
    local_ray.deploy_config(app_config("tickets", args, {}), Path.cwd())
    url = f"http://127.0.0.1:{serve_cluster}/tickets"
    client = ProtegeClient(url, timeout=60)
    client.wait_ready(120)
    assert client.model().protege.student.labels == LABELS

    before = served_escalation(url, [t for t, _ in tickets(2000, seed=7)])
    records = list(iter_records(work / "escalations"))
    audits = [r for r in records if r.reason == "audit"]
    assert audits and {r.inclusion_probability for r in audits} == {0.5}
    assert {r.teacher_status for r in audits} == {"skipped"}  # labelled by the job, offline
    escalations = [r for r in records if r.reason != "audit"]
    assert {r.reason for r in escalations} == {"low_confidence"}
    assert {r.inclusion_probability for r in escalations} == {1.0}

    config = DistillConfig.model_validate(
        {
            **yaml.safe_load((work / "distill.yaml").read_text()),
            "device": "cpu",
            "train": {"epochs": 4, "lr_encoder": 2e-3, "lr_head": 2e-3, "batch_size": 16},
            "eval": {"share": 0.5, "min_calibration_sampled": 20},
            "gate": {"target_agreement": 0.95, "min_sampled": 20},
        }
    )
    report = run(config)
    assert report["result"] == "promoted", report["reason"]
    decision = report["decision"]
    assert decision["escalation_drop"]["low"] > 0
    assert decision["candidate"]["cascade_gold_accuracy"]["records"] == 150
    assert report["calibration"]["kind"] == "live_traffic"
    assert report["offline_labelled"] >= len([a for a in audits]) // 2  # half train, half eval
    candidate = report["candidate"]
    assert registry.current() == candidate

    local_ray.deploy_config(app_config("tickets", args, {"student_version": candidate}), Path.cwd())
    wait_for(lambda: client.model().protege.student.version == candidate, timeout_s=120)
    models = client.model().protege
    assert models.threshold == pytest.approx(decision["candidate"]["threshold"])
    after = served_escalation(url, [t for t, _ in tickets(400, seed=8)])
    assert after < before - 0.1, (before, after)

    # the task's traffic sample served as traffic (a sample of the traffic is traffic too):
    # the next candidate trains on some of its texts, so with too few live calibration
    # records the fallback calibrates on the sample's other texts only, and the gate
    # checks the agreement at the threshold the candidate would serve with
    lines = (tmp_path / "traffic.jsonl").read_text().splitlines()
    sample = [json.loads(line)["text"] for line in lines]
    served_escalation(url, sample)
    fallback = config.model_copy(
        update={
            "min_records": 1,
            "eval": config.eval.model_copy(update={"min_calibration_sampled": 10**6}),
        }
    )
    second = run(fallback)
    assert second["result"] in ("promoted", "rejected", "recalibrated"), second["reason"]
    calibration = second["calibration"]
    assert calibration["kind"] == "traffic_sample"
    assert 0 < calibration["trained_texts_dropped"] < len(sample)
    assert calibration["inputs"] == len(sample) - calibration["trained_texts_dropped"]
    assert (
        f"less {calibration['trained_texts_dropped']} the candidate trained on"
        in (calibration["source"])
    )
    served = second["decision"]["served_agreement"]
    if second["result"] == "promoted":  # never shown to serve below the target
        assert served["high"] >= 0.95 - fallback.gate.agreement_margin
    local_ray_delete("tickets")


def local_ray_delete(name: str) -> None:
    from ray import serve

    serve.delete(name)
