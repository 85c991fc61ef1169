"""A teacher that fails or times out: the student answers with degraded=true, never a 5xx,
and every input chosen for escalation is still logged with its inclusion probability (its
teacher fields empty, for the distillation job to label offline)."""

import httpx
import pytest
from conftest import tiny_config, wait_for

from serving.contracts.records import iter_records

pytestmark = pytest.mark.integration


def test_teacher_timeout_gives_degraded_student_answers(deploy, tiny_pair, tmp_path):
    # 1 ms is shorter than any teacher call: every escalation times out
    config = tiny_config(tiny_pair, tmp_path, teacher_timeout_s=0.001, teacher_unready_after_s=1)
    config["cascade"] = {"threshold": 0.5, "audit_fraction": 1.0, "audit_teacher": "online"}
    client = deploy("degraded", config)
    texts = ["Shares slide as oil prices jump", "Striker scores twice in cup final"]
    outputs = client.classify(texts, threshold=1.0).outputs  # everything escalates
    for output in outputs:
        assert output.degraded and output.escalated
        assert output.tier == "student"
        assert output.model_version == client.model().protege.student.version
    records = list(iter_records(tmp_path))
    assert sorted(r.text for r in records) == sorted(texts)
    for record in records:
        assert record.reason == "forced" and record.inclusion_probability == 1.0  # threshold=1
        assert record.teacher_status == "timeout" and record.teacher_probs is None
    kept = client.classify(texts, threshold=0.0, request_id="kept").outputs
    assert not any(o.degraded for o in kept)
    # audits whose teacher timed out are logged too, at the audit fraction
    audits = wait_for(lambda: [r for r in iter_records(tmp_path) if r.request_id == "kept"] or None)
    assert len(audits) == 2 and {r.reason for r in audits} == {"audit"}
    assert {r.teacher_status for r in audits} == {"timeout"}

    # a teacher that keeps failing makes the gateway unready within teacher_unready_after_s
    def unready():
        response = httpx.get(str(client._http.base_url).rstrip("/") + "/readyz", timeout=30)
        return response if response.status_code == 503 else None

    response = wait_for(unready, timeout_s=30)
    assert "teacher failing for" in response.json()["reason"]
    assert client.classify(texts, threshold=1.0).outputs[0].degraded  # still answering


def test_an_unusable_log_folder_never_stops_serving(deploy, tiny_pair, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # root ignores permissions: a file blocks mkdir
    client = deploy("nolog", tiny_config(tiny_pair, blocker / "log"))
    texts = ["Shares slide as oil prices jump", "Striker scores twice in cup final"]
    outputs = client.classify(texts, force_tier="teacher").outputs
    assert [o.tier for o in outputs] == ["teacher", "teacher"] and not any(
        o.degraded for o in outputs
    )
    assert client.model().protege.student.version  # the replica is up and answering
    assert blocker.read_text() == "not a folder"
