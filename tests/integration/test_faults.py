"""Faults under load on a real local Ray Serve: overload, a slow teacher behind the
bulkhead, a deadline, and a teacher that errors or hangs on every call."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import auth, deploy_with_teacher, tiny_config, wait_for
from faulty_teacher import FaultyTeacher

from serving.config import ModelSpec
from serving.contracts.records import iter_records

pytestmark = pytest.mark.integration


def teacher(tiny_pair, mode: str, delay_s: float = 0.0, calls_dir=None):
    calls = None if calls_dir is None else str(calls_dir)
    return FaultyTeacher.bind(ModelSpec(path=tiny_pair[1]), mode, delay_s, calls)


def post(url: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json=body, headers={**auth(), **headers}, timeout=120)


def base(client) -> str:
    return str(client._http.base_url).rstrip("/")


def test_overload_is_answered_503_with_retry_after(serve_cluster, tiny_pair, tmp_path):
    args = tiny_config(tiny_pair, tmp_path, teacher_timeout_s=60)
    client = deploy_with_teacher(
        serve_cluster,
        "overload",
        args,
        teacher(tiny_pair, "slow", 3.0),
        max_ongoing_requests=2,
        max_queued_requests=2,
    )
    url = base(client)
    forced = {"inputs": ["a headline"], "force_tier": "teacher"}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda _: post(url, forced), range(12)))
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses  # 2 running + 2 queued, the rest shed
    assert statuses[200] >= 4
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
    assert client.classify("after the burst").outputs  # and the replica is fine


def test_the_bulkhead_keeps_the_student_path_fast_while_the_teacher_is_slow(
    serve_cluster, tiny_pair, tmp_path
):
    args = tiny_config(tiny_pair, tmp_path, teacher_timeout_s=60)
    args["overload"] = {"teacher_max_in_flight": 2}
    calls = tmp_path / "teacher-calls"
    calls.mkdir()
    client = deploy_with_teacher(
        serve_cluster, "bulkhead", args, teacher(tiny_pair, "slow", 8.0, calls)
    )
    url = base(client)
    done: list[str] = []

    def send(name: str, body: dict) -> httpx.Response:
        response = post(url, body)
        done.append(name)
        return response

    with ThreadPoolExecutor(4) as pool:
        held = [
            pool.submit(send, f"held{i}", {"inputs": [f"slow {i}"], "threshold": 1.0})
            for i in range(2)
        ]
        wait_for(lambda: len(list(calls.iterdir())) >= 2 or None)  # the bulkhead is full
        shed = pool.submit(
            send, "shed", {"inputs": ["beyond the bound"], "threshold": 1.0}
        ).result()
        student = pool.submit(
            send, "student", {"inputs": ["kept"], "force_tier": "student"}
        ).result()
        assert done == ["shed", "student"]  # answered while the teacher still holds the two
        held_outputs = [f.result().json()["outputs"][0] for f in held]
    output = shed.json()["outputs"][0]
    assert (output["tier"], output["escalated"], output["degraded"]) == ("student", True, True)
    assert student.json()["outputs"][0]["tier"] == "student"
    assert [o["tier"] for o in held_outputs] == ["teacher", "teacher"]
    skipped = wait_for(
        lambda: [r for r in iter_records(tmp_path) if r.text == "beyond the bound"] or None
    )
    assert skipped[0].teacher_status == "skipped"  # logged for the job to label offline


def test_the_deadline_header_caps_the_wait_for_the_teacher(serve_cluster, tiny_pair, tmp_path):
    args = tiny_config(tiny_pair, tmp_path, teacher_timeout_s=60)
    client = deploy_with_teacher(serve_cluster, "deadline", args, teacher(tiny_pair, "slow", 20.0))
    body = {"inputs": ["in a hurry"], "force_tier": "teacher"}
    response = post(base(client), body, **{"x-protege-timeout-ms": "300"})
    output = response.json()["outputs"][0]
    assert response.status_code == 200 and output["degraded"] and output["tier"] == "student"
    record = wait_for(lambda: [r for r in iter_records(tmp_path) if r.text == "in a hurry"] or None)
    assert record[0].teacher_status == "timeout"


@pytest.mark.parametrize(
    ("mode", "delay_s", "status"), [("error", 0.0, "failed"), ("slow", 30.0, "timeout")]
)
def test_a_teacher_that_fails_every_call_degrades_never_5xx_and_turns_unready(
    serve_cluster, tiny_pair, tmp_path, metrics_port, mode, delay_s, status
):
    args = tiny_config(tiny_pair, tmp_path, teacher_timeout_s=0.5, teacher_unready_after_s=2)
    name = f"dead-teacher-{mode}"
    client = deploy_with_teacher(serve_cluster, name, args, teacher(tiny_pair, mode, delay_s))
    url = base(client)
    body = {"inputs": ["one", "two"], "threshold": 1.0}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: post(url, body), range(24)))
    assert {r.status_code for r in responses} == {200}
    outputs = [o for r in responses for o in r.json()["outputs"]]
    assert all(o["degraded"] and o["tier"] == "student" for o in outputs)
    assert {r.teacher_status for r in iter_records(tmp_path)} == {status}

    # unready once every call has failed for teacher_unready_after_s (2 s here)
    def unready():
        response = httpx.get(f"{url}/readyz", timeout=30)
        return response if response.status_code == 503 else None

    assert "teacher failing for" in wait_for(unready, timeout_s=60).json()["reason"]
    assert post(url, body).status_code == 200  # still answering, degraded

    def degraded_inputs() -> float | None:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ray_protege_inputs_total{")
            and 'outcome="degraded"' in line
            and f'application="{name}"' in line
        )
        return total if total >= len(outputs) else None

    assert wait_for(degraded_inputs, timeout_s=60) >= len(outputs)
