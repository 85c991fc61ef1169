"""``protege bench --task generate`` end to end on tiny models: the command in its own
process (its own local Ray Serve with three applications), asked through the official
``openai`` client, its tables written into a docs page.

Every answer escalates (threshold 1.0), so the served cascade's answers, with the draft and
without it, are the teacher's greedy ones: they agree fully with the teacher served alone.
Slow (a minute or two: Ray and six replicas start on 2 cores), so not in ``make test``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_lm import build_tiny_lm

from protege.headline_task import INSTRUCTION

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
OPENINGS = [
    "The cat sat on the mat.",
    "Markets rose today as shares in tech firms climbed.",
    "Ministers agree new budget plan, and the vote passes.",
    "The dog ate the bone.",
]
PAGE = (
    "# Generation\n\n<!-- draft-reuse:begin -->\n<!-- draft-reuse:end -->\n\n"
    "## Benchmark\n\n<!-- bench-generate:begin -->\n<!-- bench-generate:end -->\n"
)


def tiny_cache(root: Path) -> Path:
    generate = root / "generate"
    student = build_tiny_lm(generate / "models" / "student", seed=2, layers=1)
    teacher = build_tiny_lm(generate / "models" / "teacher", seed=1, layers=2)
    data = generate / "data"
    data.mkdir(parents=True)
    with open(data / "gold.jsonl", "w") as handle:
        for i in range(12):
            opening = OPENINGS[i % len(OPENINGS)] * (1 + i // len(OPENINGS))
            messages = [{"role": "user", "content": f"{INSTRUCTION}\n\n{opening}"}]
            handle.write(json.dumps({"messages": messages, "reference": opening[:20]}) + "\n")
    app = {
        "name": "protege",
        "route_prefix": "/",
        "import_path": "serving.app:build_app",
        "args": {
            "access": {"required": False},
            "generate": {
                "student": {"path": str(student)},
                "teacher": {"path": str(teacher)},
                "threshold": 1.0,  # every answer escalates
                "max_prompt_tokens": 160,
                "max_new_tokens": 8,
                "log": {"dir": str(root / "generations")},
            },
        },
    }
    (generate / "serve_config.yaml").write_text(yaml.safe_dump({"applications": [app]}))
    return root


def test_the_bench_measures_every_row_and_writes_its_tables(tmp_path):
    cache = tiny_cache(tmp_path / "cache")
    page = tmp_path / "generation.md"
    page.write_text(PAGE)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "protege.cli", "bench", "--task", "generate"]
    command += ["--cache", str(cache), "--requests", "6", "--concurrency", "2"]
    command += ["--out", str(out), "--docs", str(page)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["scenario"], r["stack"]): r for r in report["rows"]}
    assert len(rows) == 10 and all(r["failed"] == 0 and r["requests"] == 6 for r in rows.values())
    served = {name: r for (name, stack), r in rows.items() if stack == "Ray Serve"}
    assert served["student alone"]["escalated"] == 0.0
    assert served["teacher alone"]["escalated"] == 0.0
    for name in ("cascade, draft reuse", "cascade, no draft reuse"):
        assert served[name]["escalated"] == 1.0
        assert served[name]["teacher_agreement"] == 1.0  # the teacher's greedy answers
        assert served[name]["share_of_limit"] > 0
    assert served["cascade, draft reuse"]["drafts_verified"] > 0
    assert served["cascade, no draft reuse"]["drafts_verified"] == 0
    assert all(r["equal"] for r in report["draft_reuse"]["runs"])
    text = page.read_text()
    assert "| cascade, draft reuse | Ray Serve |" in text and "| whole draft accepted |" in text
