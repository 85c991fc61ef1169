import argparse

import pytest

from protege.distill_cli import parse_duration, summary
from protege.gateway_process import with_student


def test_durations():
    assert parse_duration("15m") == 900 and parse_duration("90s") == 90
    assert parse_duration("1h") == 3600 and parse_duration("42") == 42
    with pytest.raises(argparse.ArgumentTypeError, match="not a duration"):
        parse_duration("soon")


def test_with_student_changes_only_the_gateway_user_config():
    config = {
        "applications": [
            {
                "name": "protege",
                "args": {"cascade": {"scorer": "max_prob"}},
                "deployments": [{"name": "Gateway", "num_replicas": 2}, {"name": "Teacher"}],
            }
        ]
    }
    updated = with_student(config, "student-abc")
    gateway, teacher = updated["applications"][0]["deployments"]
    assert gateway == {
        "name": "Gateway",
        "num_replicas": 2,
        "user_config": {"student_version": "student-abc"},
    }
    assert teacher == {"name": "Teacher"}
    assert updated["applications"][0]["args"] == config["applications"][0]["args"]
    assert "user_config" not in config["applications"][0]["deployments"][0]  # a copy


def test_run_summary_reads_like_the_report():
    text = summary(
        {
            "run_id": "r1",
            "result": "nothing-to-do",
            "reason": "3 new records",
            "window": {"new_records": 3},
        }
    )
    assert "r1: nothing-to-do - 3 new records" in text and "new_records=3" in text


def test_demo_spread_puts_seeds_side_by_side(tmp_path):
    import json

    from protege.demo_report import spread

    def figures(esc: float, needed: float) -> dict:
        return {
            "escalation_rate": esc,
            "cascade_gold_accuracy": 0.92,
            "escalation_needed": needed,
        }

    folders = []
    for seed, final in ((0, 0.15), (1, 0.25)):
        live = {"value": final, "low": final - 0.05, "high": final + 0.05, "sampled": 120}
        run = {
            "summary": {
                "demo_seed": seed,
                "seed": figures(0.4, 0.6),
                "final": figures(final, 0.3),
                "ratio_final_to_seed": 0.5,
            },
            "rounds": [
                {
                    "result": "promoted",
                    "decision": {
                        "candidate": {"escalation_rate": live},
                        "escalation_drop": {"value": 0.12, "low": 0.05},
                    },
                }
            ],
        }
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "demo.json").write_text(json.dumps(run))
        folders.append(tmp_path / str(seed))
    table = spread(folders)
    assert "| 0 | promoted | +12.0% [+5.0%] | 15.0% [10.0%, 20.0%] | 120 |" in table
    assert "final holdout escalation 15.0% to 25.0%" in table


def test_keys_new_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys):
    from protege.cli import main
    from serving.access import gatekeeper
    from serving.config import AccessConfig

    path = tmp_path / "api-keys.yaml"
    assert main(["keys", "new", "billing", "--overrides", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert key not in path.read_text()
    assert gatekeeper(AccessConfig(keys_file=path)).caller(f"Bearer {key}").overrides
    assert main(["keys", "new", "billing", "--file", str(path)]) == 2  # one key per name
    assert "already holds a key named 'billing'" in capsys.readouterr().err
