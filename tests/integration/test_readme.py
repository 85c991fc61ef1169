"""The README's request examples, run as written against a gateway on tiny models, so the
first page a newcomer reads cannot drift from what the gateway answers.

The examples to run are the fenced blocks right after a ``<!-- test: readme-example -->``
line. Only the documented address is rewritten (to the test gateway's); the API key comes
through ``$PROTEGE_KEY``, as the README says. A curl example followed by a ```json block
must answer with exactly that block's shape: the same keys at every level, the same
number of outputs, the same kinds of values.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import steering, tiny_config

from serving.client import ProtegeClient
from serving.schemas import ClassifyResponse

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
MARK = "<!-- test: readme-example -->"
DOCUMENTED_URL = "http://127.0.0.1:8000"
EXAMPLE = re.compile(
    re.escape(MARK) + r"[ \t]*\n```(\w+)\n(.*?)\n```[ \t]*\n(?:\s*```json\n(.*?)\n```)?",
    re.DOTALL,
)


def examples(language: str) -> list[tuple[str, str | None]]:
    """The README's marked blocks in ``language``: (code, the ```json answer after it)."""
    found = EXAMPLE.findall(README.read_text())
    return [(code, answer or None) for lang, code, answer in found if lang == language]


def shape(value: Any) -> Any:
    """What a JSON value looks like, without its values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(item) for item in value]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else type(value).__name__


@pytest.fixture(scope="module")
def gateway(deploy, serve_cluster, tiny_pair, tmp_path_factory) -> tuple[str, ProtegeClient]:
    """The tiny pair behind a key, every confident input audited (so every request logs)."""
    log_dir = tmp_path_factory.mktemp("readme-log")
    cascade = {"threshold": 0.5, "audit_fraction": 1.0}
    client = deploy("readme", tiny_config(tiny_pair, log_dir, cascade=cascade))
    return f"http://127.0.0.1:{serve_cluster}/readme", client


def as_run_here(code: str, url: str) -> str:
    assert DOCUMENTED_URL in code, f"the example does not use {DOCUMENTED_URL}: {code}"
    return code.replace(DOCUMENTED_URL, url)


def test_the_readme_marks_a_curl_and_a_python_example():
    assert [answer is not None for _, answer in examples("bash")] == [True]
    assert len(examples("python")) == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="the curl example needs curl")
def test_the_curl_example_answers_as_documented(gateway):
    url, client = gateway
    (code, documented), *_ = examples("bash")
    run = subprocess.run(
        ["bash", "-eu", "-c", as_run_here(code, url)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"PROTEGE_KEY": steering()[0]},
    )
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert shape(answer) == shape(json.loads(documented)), run.stdout
    response = ClassifyResponse.model_validate(answer)
    body = json.loads(re.search(r"-d '(.*)'", code, re.DOTALL).group(1))
    request_id = re.search(r"x-request-id: ([\w-]+)", code).group(1)
    assert response.request_id == request_id and len(response.outputs) == len(body["inputs"])
    models = client.model().protege
    for output in response.outputs:
        assert output.tier == ("teacher" if output.escalated else "student")
        served = models.teacher if output.escalated else models.student
        assert output.model_version == served.version
        assert set(output.probabilities) == set(served.labels)
    assert response.logged is True


def test_the_python_example_prints_an_answer(gateway, monkeypatch, capsys):
    url, client = gateway
    (code, _), *_ = examples("python")
    monkeypatch.setenv("PROTEGE_KEY", steering()[0])
    exec(compile(as_run_here(code, url), f"{README} (python example)", "exec"), {})
    label, tier, version, confidence = capsys.readouterr().out.split()
    models = client.model().protege
    served = models.teacher if tier == "teacher" else models.student
    assert tier in ("student", "teacher") and version == served.version
    assert label in served.labels and 0.0 <= float(confidence) <= 1.0


@pytest.mark.skipif(shutil.which("curl") is None, reason="the curl example needs curl")
def test_a_wrong_key_is_refused_so_the_examples_really_send_one(gateway):
    url, _ = gateway
    (code, _), *_ = examples("bash")
    run = subprocess.run(
        [
            "bash",
            "-eu",
            "-c",
            as_run_here(code, url).replace("curl -s", "curl -s -w '%{http_code}'"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"PROTEGE_KEY": "not-a-key"},
    )
    assert run.stdout.endswith("401"), run.stdout
