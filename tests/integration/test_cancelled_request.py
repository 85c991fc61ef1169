"""A request cancelled while its escalated inputs wait on a slow teacher, through the real
gateway on a local Ray Serve: once by a client that disconnects, once by Serve's request
timeout (the per-request form of ``request_timeout_s``). Each request's records are in the
log folder, its escalations ``cancelled`` and its online audit answered, under one key."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import auth, deploy_with_teacher, tiny_config, wait_for
from faulty_teacher import FaultyTeacher

from serving.config import ModelSpec
from serving.contracts.records import iter_records

pytestmark = pytest.mark.integration
TEXTS = ["first headline", "second headline about sport", "a third one", "and a fourth"]
TEACHER_DELAY_S = 4.0  # longer than it takes to cancel; an online audit waits this long


def send_then_hang_up(port: int, path: str, body: dict, request_id: str, started) -> None:
    """POST over a raw socket and close it, unanswered, once ``started()`` holds."""
    payload = json.dumps(body).encode()
    headers = {
        **auth(),
        "Host": f"127.0.0.1:{port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(payload)),
        "x-request-id": request_id,
    }
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head.encode() + b"\r\n" + payload)
        wait_for(started)  # the escalated inputs wait on the teacher
    # the connection is closed: the proxy sees the disconnect and cancels the request


def test_a_cancelled_request_logs_its_escalations_and_audits(serve_cluster, tiny_pair, tmp_path):
    calls = tmp_path / "teacher-calls"
    calls.mkdir()
    log = tmp_path / "log"
    args = tiny_config(tiny_pair, log, teacher_timeout_s=60)
    args["cascade"] = {"threshold": 0.5, "audit_fraction": 1.0, "audit_teacher": "online"}
    teacher = FaultyTeacher.bind(ModelSpec(path=tiny_pair[1]), "slow", TEACHER_DELAY_S, str(calls))
    client = deploy_with_teacher(serve_cluster, "cancelled", args, teacher)
    url = f"http://127.0.0.1:{serve_cluster}/cancelled/v1/classify"

    # a threshold between the student's confidences: some inputs escalate, the rest audit
    probe = httpx.post(
        url, json={"inputs": TEXTS, "force_tier": "student"}, headers=auth(), timeout=60
    )
    confidences = sorted(o["confidence"] for o in probe.json()["outputs"])
    assert confidences[0] < confidences[-1], confidences
    threshold = (confidences[0] + confidences[-1]) / 2
    escalated = {
        t
        for t, o in zip(TEXTS, probe.json()["outputs"], strict=True)
        if o["confidence"] < threshold
    }
    body = {"inputs": TEXTS, "threshold": threshold}
    wait_for(lambda: any(calls.iterdir()))  # the probe's own online audit: one teacher call
    before = len(list(calls.iterdir()))

    def escalation_started() -> bool:
        return len(list(calls.iterdir())) > before

    send_then_hang_up(serve_cluster, "/cancelled/v1/classify", body, "hung-up", escalation_started)
    timed_out = httpx.post(
        url,
        json=body,
        headers={**auth(), "x-request-id": "timed-out", "x-request-timeout-seconds": "2"},
        timeout=60,
    )
    assert timed_out.status_code == 408, timed_out.text

    def records_of(request_id: str):
        found = [r for r in iter_records(log) if r.request_id == request_id]
        return found if len(found) == len(TEXTS) else None

    with ThreadPoolExecutor(2) as pool:  # the online audits land after the teacher's delay
        waits = [
            pool.submit(wait_for, lambda i=i: records_of(i), 60) for i in ("hung-up", "timed-out")
        ]
        logged = [w.result() for w in waits]
    for records in logged:
        assert len({r.record_id for r in records}) == len(TEXTS)  # each input exactly once
        assert len({r.request_key for r in records}) == 1
        assert {r.text: (r.reason, r.teacher_status, r.inclusion_probability) for r in records} == {
            t: ("forced", "cancelled", 1.0) if t in escalated else ("audit", "answered", 1.0)
            for t in TEXTS
        }
    assert logged[0][0].request_key != logged[1][0].request_key
    assert client.classify("the replica still answers").outputs  # and no replica crashed
