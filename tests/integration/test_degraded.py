"""A teacher that fails or times out: the student answers with degraded=true, never a 5xx."""

import pytest
from conftest import tiny_config

from serving.escalation_log import iter_records

pytestmark = pytest.mark.integration


def test_teacher_timeout_gives_degraded_student_answers(deploy, tiny_pair, tmp_path):
    # 1 ms is shorter than any teacher call: every escalation times out
    client = deploy("degraded", tiny_config(tiny_pair, tmp_path, teacher_timeout_s=0.001))
    texts = ["Shares slide as oil prices jump", "Striker scores twice in cup final"]
    outputs = client.classify(texts, threshold=1.0).outputs  # everything escalates
    for output in outputs:
        assert output.degraded and output.escalated
        assert output.tier == "student"
        assert output.model_version == client.models().student.version
    assert list(iter_records(tmp_path)) == []  # no teacher answer, nothing to learn from
    kept = client.classify(texts, threshold=0.0).outputs
    assert not any(o.degraded for o in kept)
