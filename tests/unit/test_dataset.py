import itertools
import json

from test_escalation_log import record, version1_line

from distill.dataset import (
    read_generation_window,
    read_watermark,
    read_window,
    write_watermark,
)
from distill.splits import normalise, role_of
from serving.contracts.records import EscalationLogWriter
from serving.contracts.storage import LocalStore

SHARE = 0.5  # half the texts evaluate: every role shows up in a handful of texts


def texts(role: str, n: int) -> list[str]:
    """``n`` distinct headlines whose hash puts them in ``role``."""
    found = (f"headline number {i}" for i in itertools.count())
    return list(itertools.islice((t for t in found if role_of(t, SHARE) == role), n))


TRAIN = texts("train", 30)
CAL = texts("calibration", 5)
GATE = texts("gate", 5)


def window(log, watermark=None, *, replay=0, seed=0, max_eval=50_000):
    return read_window(
        log, watermark or {}, eval_share=SHARE, replay=replay, seed=seed, max_eval=max_eval
    )


def ids(records) -> list[str]:
    return [r.record_id for r in records]


def test_training_records_are_consumed_once_via_the_watermark(tmp_path):
    log = tmp_path / "log"
    writer = EscalationLogWriter(log)
    writer.append([record(i, TRAIN[i]) for i in range(5)])
    first = window(log)
    assert ids(first.new) == [f"rec{i}" for i in range(5)]
    assert write_watermark(LocalStore(tmp_path / "reg"), first.watermark, first.read)
    writer.append([record(i, TRAIN[i]) for i in range(5, 8)])
    second = window(log, read_watermark(LocalStore(tmp_path / "reg")))
    assert ids(second.new) == ["rec5", "rec6", "rec7"]
    third = window(log, second.watermark)
    assert third.new == []
    writer.close()


def test_evaluation_records_never_train_and_are_pooled_every_run(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(0, TRAIN[0]), record(1, CAL[0]), record(2, GATE[0]), record(3, TRAIN[1])])
    first = window(tmp_path, replay=10)
    assert ids(first.new) == ["rec0", "rec3"]
    assert ids(first.evaluation["calibration"]) == ["rec1"]
    assert ids(first.evaluation["gate"]) == ["rec2"]
    # an audited confident input, and the same text again: each stands for its own inputs
    writer.append(
        [
            record(4, CAL[1], inclusion_probability=0.02, reason="audit"),
            record(5, GATE[0]),
            record(6, TRAIN[2]),
        ]
    )
    second = window(tmp_path, first.watermark, replay=10)
    assert ids(second.new) == ["rec6"]
    assert ids(second.replay) and set(ids(second.replay)) <= {"rec0", "rec3"}
    assert ids(second.evaluation["calibration"]) == ["rec1", "rec4"]  # pooled again
    assert ids(second.evaluation["gate"]) == ["rec2", "rec5"]  # same text, not deduplicated
    third = window(tmp_path, second.watermark, replay=10)
    assert third.new == [] and ids(third.evaluation["gate"]) == ["rec2", "rec5"]
    described = second.describe()
    assert described["calibration_records"] == 2 and described["gate_records"] == 2
    writer.close()


def test_the_split_follows_the_normalised_text(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    shouted = "  " + GATE[0].upper().replace(" ", "   ") + "\n"
    writer.append([record(1, shouted), record(2, TRAIN[0].title())])
    result = window(tmp_path)
    assert ids(result.evaluation["gate"]) == ["rec1"] and ids(result.new) == ["rec2"]
    writer.close()


def test_evaluation_keeps_the_newest_records(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(i, CAL[i % len(CAL)], timestamp=100.0 - i) for i in range(6)])
    result = window(tmp_path, max_eval=2)
    assert ids(result.evaluation["calibration"]) == ["rec1", "rec0"]  # oldest first
    writer.close()


def test_version_1_records_train_but_never_evaluate(tmp_path):
    segment = tmp_path / "escalations-0000000000001-old-1-000001.jsonl"
    segment.write_text(
        version1_line(1, TRAIN[0]) + version1_line(2, CAL[0]) + version1_line(3, GATE[0])
    )
    first = window(tmp_path)
    assert ids(first.new) == ["req1:0"] and first.new[0].schema_version == 1
    assert first.evaluation == {"calibration": [], "gate": []}
    assert first.unweighted_eval_dropped == 2
    assert first.describe()["version1_eval_records_dropped"] == 2
    again = window(tmp_path, first.watermark)  # dropped (and counted) on every run
    assert again.new == [] and again.unweighted_eval_dropped == 2


def test_duplicate_record_ids_are_dropped_in_training(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1, TRAIN[0]), record(2, TRAIN[1]), record(3, TRAIN[2])])
    writer.append([record(1, TRAIN[0])])  # the same record written twice
    first = window(tmp_path)
    assert ids(first.new) == ["rec1", "rec2", "rec3"] and first.duplicates == 1
    writer.append([record(2, TRAIN[1]), record(4, TRAIN[3])])  # consumed in an earlier run
    second = window(tmp_path, first.watermark)
    assert ids(second.new) == ["rec4"] and second.duplicates == 1
    assert second.describe()["duplicates_dropped"] == 1
    writer.close()


def test_replay_samples_earlier_training_records_deterministically(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(i, TRAIN[i]) for i in range(20)] + [record(99, CAL[0])])
    consumed = window(tmp_path)
    writer.append([record(i, TRAIN[i]) for i in range(20, 25)])
    a = window(tmp_path, consumed.watermark, replay=6, seed=3)
    b = window(tmp_path, consumed.watermark, replay=6, seed=3)
    assert ids(a.replay) == ids(b.replay)
    assert len(a.replay) == 6 and set(ids(a.replay)) <= {f"rec{i}" for i in range(20)}
    assert ids(a.new) == [f"rec{i}" for i in range(20, 25)]
    everything = window(tmp_path, consumed.watermark, replay=100, seed=0)
    assert len(everything.replay) == 20 and "rec99" not in ids(everything.replay)
    writer.close()


def test_torn_lines_are_counted_and_never_consumed(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([record(1, TRAIN[0])])
    writer.close()
    with open(writer.current_segment, "ab") as handle:
        handle.write(record(2, TRAIN[1]).model_dump_json().encode()[:30])
    result = window(tmp_path)
    assert ids(result.new) == ["rec1"]
    assert result.stats.skipped_lines == 1
    again = window(tmp_path, result.watermark)
    assert again.new == [] and again.stats.skipped_lines == 1
    assert json.loads(json.dumps(again.describe()))["corrupt_or_torn_lines"] == 1


def test_every_consumed_training_text_is_known_to_the_next_run(tmp_path):
    """What the current student's lineage may have trained on: the fallback calibration
    must leave those texts out too, not only this run's."""
    log = tmp_path / "log"
    writer = EscalationLogWriter(log)
    writer.append([record(i, TRAIN[i].upper()) for i in range(5)] + [record(9, CAL[0])])
    first = window(log)
    assert first.consumed_texts == set()
    writer.append([record(i, TRAIN[i]) for i in range(5, 8)])
    second = window(log, first.watermark)
    assert second.consumed_texts == {TRAIN[i].lower() for i in range(5)}  # normalised
    writer.close()


def prompts(role: str, n: int) -> list[str]:
    """``n`` distinct completion prompts whose canonical prompt puts them in ``role``."""
    found = (f"Headline for article {i}:" for i in itertools.count())
    return list(itertools.islice((p for p in found if role_of(p, SHARE) == role), n))


def test_a_classification_window_skips_generation_records_and_counts_them(tmp_path):
    """One log may hold both kinds: a classification job reads its own records only, and
    the generation records (read without their top-k) are counted, never an error."""
    from test_generation_records import generation

    writer = EscalationLogWriter(tmp_path)
    gen = [
        generation(10 + i, prompt=p, messages=None, timestamp=2e9 + i)  # the newest records
        for i, p in enumerate(prompts("train", 2) + prompts("calibration", 2) + prompts("gate", 2))
    ]
    writer.append([record(0, TRAIN[0]), gen[0], record(1, CAL[0]), gen[2], record(2, GATE[0])])
    writer.append(gen[1:2] + gen[3:])
    first = window(tmp_path)
    assert ids(first.new) == ["rec0"]
    assert ids(first.evaluation["calibration"]) == ["rec1"]
    assert ids(first.evaluation["gate"]) == ["rec2"]
    assert first.other_kind == 6 and first.describe()["other_kind_records"] == 6
    assert first.stats.kinds == {"classify": 3, "generate": 6}
    assert first.stats.skipped_lines == 0
    writer.append([generation(20, prompt=prompts("train", 3)[2], messages=None)])
    second = window(tmp_path, first.watermark)  # counted once, after the watermark
    assert second.new == [] and second.other_kind == 1
    assert ids(second.evaluation["gate"]) == ["rec2"]
    writer.close()


def test_a_generation_window_reads_its_own_kind_split_by_the_canonical_prompt(tmp_path):
    """The generative job's window: generation records only, split by the canonical
    prompt, the training ones with their top-k, the evaluation ones without, consumed
    once by the watermark, replayed later."""
    from test_generation_records import generation

    writer = EscalationLogWriter(tmp_path)
    train, cal, gate = prompts("train", 3), prompts("calibration", 1), prompts("gate", 2)
    gen = [generation(i, prompt=p, messages=None) for i, p in enumerate(train + cal + gate)]
    writer.append([record(0, TRAIN[0]), *gen[:4], record(1, GATE[0]), *gen[4:]])
    first = read_generation_window(tmp_path, {}, eval_share=SHARE, replay=0, seed=0)
    assert ids(first.new) == ["gen0", "gen1", "gen2"]
    assert all(
        r.teacher_top_logprobs == gen[i].teacher_top_logprobs for i, r in enumerate(first.new)
    )
    assert ids(first.evaluation["calibration"]) == ["gen3"]
    assert ids(first.evaluation["gate"]) == ["gen4", "gen5"]
    gate = first.evaluation["gate"]
    assert all(r.teacher_top_logprobs is None and r.top_k_dropped for r in gate)  # never built
    assert first.other_kind == 2  # the classification records: another job's
    assert first.consumed_texts == set()
    writer.append([generation(9, prompt=train[0], messages=None, record_id="gen9")])
    second = read_generation_window(tmp_path, first.watermark, eval_share=SHARE, replay=2, seed=0)
    assert ids(second.new) == ["gen9"]  # the same prompt again: a new record, trained once
    assert len(second.replay) == 2 and set(ids(second.replay)) <= {"gen0", "gen1", "gen2"}
    assert all(r.teacher_top_logprobs is not None for r in second.replay)  # they train
    assert second.consumed_texts == {normalise(r.split_text) for r in gen[:3]}
    writer.close()


def test_a_classification_job_on_a_mixed_log_skips_the_generation_records(tmp_path):
    """The real job, up to the evidence check: generation records in the evaluation splits,
    logged with a generative scorer and newer than every classification record, neither
    crash it nor trip its scorer check."""
    from test_generation_records import generation
    from test_registry import staged_version

    from distill.config import DistillConfig
    from distill.job import run
    from serving.contracts.registry import Registry

    registry = Registry(tmp_path / "reg")
    registry.publish(staged_version(tmp_path, "seed"))
    registry.promote("seed")
    writer = EscalationLogWriter(tmp_path / "log")
    writer.append([record(i, TRAIN[i]) for i in range(3)] + [record(3, GATE[0])])
    eval_prompts = prompts("calibration", 2) + prompts("gate", 2)
    writer.append(
        [
            generation(10 + i, prompt=p, messages=None, timestamp=2e9)
            for i, p in enumerate(eval_prompts)
        ]
    )
    writer.close()
    config = DistillConfig(
        registry=str(tmp_path / "reg"),
        log_dir=str(tmp_path / "log"),
        teacher=tmp_path / "teacher",  # never loaded: the run stops before training
        work_dir=tmp_path / "work",
        min_records=1,
        eval={"share": SHARE},
    )
    report = run(config)
    assert report["result"] == "not-enough-evidence"  # no audited record in the gate split
    assert report["window"]["new_records"] == 3 and report["window"]["gate_records"] == 1
    assert report["window"]["other_kind_records"] == 4
