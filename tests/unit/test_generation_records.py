"""The generation record (schema version 4, kind ``generate``) in the one escalation log:
written by the real writer, read by the real reader beside classification records of every
version, with its heavy top-k read only when asked."""

import json
import math
import random
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_escalation_log import record, version1_line, version2_line

from distill.splits import bucket, role_of
from serving.contracts.generation_records import (
    MIN_LOGPROB,
    TOP_K,
    GenerationRecord,
    TopKLogprobs,
    canonical_prompt,
)
from serving.contracts.records import (
    EscalationLogWriter,
    EscalationRecord,
    ReadStats,
    iter_records,
    iter_segment,
    list_segments,
    read_from,
)

GOLDEN = Path(__file__).parent / "golden"
VOCAB = 49_152  # SmolLM2's: ids of up to five digits, as in the default pair's records
CHAT = [
    {"role": "system", "content": "Write a headline for the article."},
    {"role": "user", "content": "The central bank raised interest rates again on Thursday."},
]


def top_k(tokens: int, k: int = TOP_K, seed: int = 0) -> TopKLogprobs:
    """A teacher's greedy top-k over ``tokens`` positions: the emitted token is each
    position's most likely one."""
    rng = random.Random(seed)
    ids = [rng.sample(range(VOCAB), k) for _ in range(tokens)]
    logprobs = [sorted((-rng.expovariate(0.3) for _ in range(k)), reverse=True) for _ in ids]
    return TopKLogprobs(tokens=[row[0] for row in ids], ids=ids, logprobs=logprobs)


def generation(i: int, *, chat: bool = True, tokens: int = 20, **update) -> GenerationRecord:
    """An escalated greedy generation the teacher answered after checking a 12-token draft."""
    fields = {
        "record_id": f"gen{i}",
        "request_id": f"req{i}",
        "request_key": f"key{i}",
        "timestamp": 1_700_000_000.0 + i,
        "student_text": "Bank raises rates",
        "student_version": "s1",
        "scorer": "mean_logprob",
        "confidence": 0.31,
        "threshold": 0.5,
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 24, "stop": ["\n"]},
        "reason": "low_confidence",
        "inclusion_probability": 1.0,
        "teacher_status": "answered",
        "teacher_version": "t1",
        "teacher_text": "Central bank raises interest rates again",
        "draft_tokens": 12,
        "draft_accepted": 7,
        "teacher_top_logprobs": top_k(tokens, seed=i),
    }
    fields |= {"messages": CHAT} if chat else {"prompt": "Headline: rates rise again."}
    return GenerationRecord.model_validate(fields | update)


def unanswered(status: str = "failed", **update) -> dict:
    """A generation record's fields whose teacher gave nothing."""
    fields = generation(0).model_dump()
    fields |= {"teacher_status": status, "teacher_version": None, "teacher_text": None}
    return fields | {"teacher_top_logprobs": None, "draft_tokens": None, "draft_accepted": None}


def test_a_generation_record_with_its_top_k_round_trips_through_a_real_segment(tmp_path):
    written = [generation(1), generation(2, chat=False), generation(3, tokens=0)]
    writer = EscalationLogWriter(tmp_path, writer_id="gen#1")
    writer.append(written)
    writer.close()
    (segment,) = list_segments(tmp_path)
    stats = ReadStats()
    back = list(iter_segment(segment, stats, with_top_k=True))
    assert back == written and stats.skipped_lines == 0 and stats.kinds == {"generate": 3}
    first = back[0]
    assert first.kind == "generate" and first.schema_version == 4 and first.evaluable
    assert first.teacher_top_logprobs is not None and first.teacher_top_logprobs.k == TOP_K
    assert first.messages is not None and first.messages[1].role == "user"
    assert back[1].prompt == "Headline: rates rise again." and back[1].messages is None
    assert not first.top_k_dropped
    # the pairs come back as the generator gives them: (id, log-probability), most likely first
    pairs = first.teacher_top_logprobs.pairs()
    assert TopKLogprobs.from_pairs(first.teacher_top_logprobs.tokens, pairs) == (
        first.teacher_top_logprobs
    )


def test_the_lean_reader_never_builds_the_top_k(tmp_path):
    """Evaluation reads lean: the field is removed before validation. A line whose top-k is
    invalid still reads lean, which shows pydantic never saw it; a training read refuses it."""
    full = generation(1)
    bad_top_k = json.loads(generation(2).model_dump_json())
    bad_top_k["teacher_top_logprobs"]["logprobs"][0].reverse()  # least likely first
    path = tmp_path / "escalations-0000000000001-x-1-000001.jsonl"
    path.write_text(full.model_dump_json() + "\n" + json.dumps(bad_top_k) + "\n")
    stats = ReadStats()
    lean = list(iter_records(tmp_path, stats))
    assert [r.record_id for r in lean] == ["gen1", "gen2"] and stats.skipped_lines == 0
    assert all(r.teacher_top_logprobs is None and r.top_k_dropped for r in lean)
    assert "teacher_top_logprobs" not in lean[0].model_dump(exclude_none=True)
    everything_else = {"exclude": {"teacher_top_logprobs"}}
    assert lean[0].model_dump(**everything_else) == full.model_dump(**everything_else)
    stats = ReadStats()
    (kept,) = iter_records(tmp_path, stats, with_top_k=True)
    assert kept == full and not kept.top_k_dropped
    assert stats.skipped_lines == 1 and "sorted, most likely first" in stats.skipped_reasons[0]


def test_a_lean_read_of_a_record_without_top_k_says_nothing_was_dropped(tmp_path):
    failed = GenerationRecord.model_validate(unanswered("failed"))
    writer = EscalationLogWriter(tmp_path)
    writer.append([failed])
    writer.close()
    (back,) = iter_records(tmp_path)
    assert back == failed and not back.top_k_dropped and back.teacher_status == "failed"


def test_one_log_holds_both_kinds_and_every_version(tmp_path):
    """Versions 1-3 (no ``kind``) read as classification records beside version-4 records
    of both kinds; the stats count each kind."""
    path = tmp_path / "escalations-0000000000001-mixed-1-000001.jsonl"
    path.write_text(
        version1_line(1)
        + version2_line(2)
        + generation(3).model_dump_json()
        + "\n"
        + record(4).model_dump_json()
        + "\n"
    )
    writer = EscalationLogWriter(tmp_path, writer_id="later")
    writer.append([generation(5, chat=False), record(6)])
    writer.close()
    stats = ReadStats()
    read = list(iter_records(tmp_path, stats))
    assert [(r.record_id, r.kind, r.schema_version) for r in read] == [
        ("req1:0", "classify", 1),
        ("rec2", "classify", 2),
        ("gen3", "generate", 4),
        ("rec4", "classify", 4),
        ("gen5", "generate", 4),
        ("rec6", "classify", 4),
    ]
    assert stats.kinds == {"classify": 4, "generate": 2} and stats.skipped_lines == 0
    assert [type(r) for r in read[:3]] == [EscalationRecord, EscalationRecord, GenerationRecord]


def test_the_golden_version_4_lines_are_still_read():
    """A version-4 classification line and a version-4 generation line as this version's
    writer wrote them (kept in a file; the older versions have their own golden file)."""
    stats = ReadStats()
    golden = GOLDEN / "escalations-0000000000004-golden-1-000001.jsonl"
    classify, chat, completion = iter_segment(golden, stats, with_top_k=True)
    assert stats.skipped_lines == 0
    assert isinstance(classify, EscalationRecord) and classify.kind == "classify"
    assert classify.schema_version == 4 and classify.teacher_label == "sport"
    assert isinstance(chat, GenerationRecord) and chat.teacher_top_logprobs is not None
    assert chat.teacher_top_logprobs.k == 2 and chat.teacher_top_logprobs.tokens == [504, 77]
    assert (chat.draft_tokens, chat.draft_accepted) == (3, 2) and chat.sampling.greedy
    assert isinstance(completion, GenerationRecord) and completion.teacher_status == "skipped"
    assert completion.sampling.temperature == 0.7 and completion.sampling.seed == 11
    assert math.isnan(completion.confidence) and completion.gold_reference == "Rates rise"


def test_a_torn_generation_line_is_skipped_and_counted(tmp_path):
    writer = EscalationLogWriter(tmp_path)
    writer.append([generation(1), record(2)])
    segment = writer.current_segment
    whole = generation(3).model_dump_json().encode()
    with open(segment, "ab") as handle:  # a crash inside the top-k
        handle.write(whole[: len(whole) - 500])
    stats = ReadStats()
    records, end = read_from(segment, 0, stats, with_top_k=True)
    assert [r.record_id for r in records] == ["gen1", "rec2"]
    assert stats.skipped_lines == 1 and "torn line" in stats.skipped_reasons[0]
    assert read_from(segment, end)[0] == []  # the torn line is never half-read
    writer.close()


def test_a_nan_confidence_is_written_as_null_and_read_back(tmp_path):
    nan = generation(1, confidence=float("nan"))
    assert '"confidence":null' in nan.model_dump_json()
    writer = EscalationLogWriter(tmp_path)
    writer.append([nan])
    writer.close()
    stats = ReadStats()
    (back,) = iter_records(tmp_path, stats, with_top_k=True)
    assert stats.skipped_lines == 0 and math.isnan(back.confidence)


def test_an_unknown_kind_or_an_invalid_generation_line_is_skipped_with_a_reason(tmp_path):
    path = tmp_path / "escalations-0000000000001-x-1-000001.jsonl"
    other = json.loads(generation(2).model_dump_json()) | {"kind": "embed"}
    both = json.loads(generation(3).model_dump_json()) | {"prompt": "and a prompt"}
    path.write_text(
        "\n".join([generation(1).model_dump_json(), json.dumps(other), json.dumps(both)]) + "\n"
    )
    stats = ReadStats()
    assert [r.record_id for r in iter_records(tmp_path, stats)] == ["gen1"]
    assert stats.skipped_lines == 2
    assert "kind 'embed'" in stats.skipped_reasons[0]
    assert "invalid record of kind generate" in stats.skipped_reasons[1]
    assert "exactly one of `prompt`" in stats.skipped_reasons[1]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher_text": None}, "teacher_status 'answered' with no teacher text"),
        (
            {"teacher_status": "failed", "teacher_top_logprobs": None, "draft_tokens": None}
            | {"draft_accepted": None},
            "teacher_status 'failed' with a teacher text",
        ),
        ({"prompt": "a prompt as well"}, "exactly one of `prompt`.*got both"),
        ({"messages": None}, "exactly one of `prompt`.*got neither"),
        ({"messages": []}, "at least one message"),
        ({"draft_accepted": None}, "set both when the teacher checked a draft"),
        ({"draft_accepted": 13}, "draft_accepted=13 exceeds draft_tokens=12"),
        (
            {"sampling": {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 24}},
            "drafts are checked only for greedy answers",
        ),
        ({"schema_version": 3}, "begin at schema version 4"),
        ({"request_key": ""}, "need request_key"),
        ({"inclusion_probability": 0.0}, "inclusion_probability"),
        ({"unknown_field": 1}, "Extra inputs are not permitted"),
    ],
)
def test_an_inconsistent_generation_record_is_refused_with_the_fix(change, message):
    fields = generation(1).model_dump() | change
    with pytest.raises(ValidationError, match=message):
        GenerationRecord.model_validate(fields)


@pytest.mark.parametrize("status", ["failed", "timeout", "skipped", "cancelled"])
def test_every_unanswered_status_has_no_teacher_fields(status):
    assert GenerationRecord.model_validate(unanswered(status)).teacher_status == status
    with pytest.raises(ValidationError, match="the top-k belongs to a teacher answer"):
        GenerationRecord.model_validate(
            unanswered(status) | {"teacher_top_logprobs": top_k(3).model_dump()}
        )


def test_a_draft_is_not_recorded_for_a_teacher_never_asked():
    with pytest.raises(ValidationError, match="'skipped': the teacher was not asked"):
        GenerationRecord.model_validate(
            unanswered("skipped") | {"draft_tokens": 4, "draft_accepted": 0}
        )
    # a teacher that failed after checking the draft keeps what it checked
    failed = GenerationRecord.model_validate(
        unanswered("failed") | {"draft_tokens": 4, "draft_accepted": 4}
    )
    assert failed.draft_accepted == 4


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"tokens": [1], "ids": [[1, 2]], "logprobs": [[-0.1, -2.0], [-0.1, -2.0]]}, "one row"),
        ({"tokens": [1], "ids": [[1, 2]], "logprobs": [[-0.1]]}, "same k"),
        ({"tokens": [1], "ids": [[1, 1]], "logprobs": [[-0.1, -2.0]]}, "distinct"),
        ({"tokens": [1], "ids": [[1, 2]], "logprobs": [[-2.0, -0.1]]}, "most likely first"),
        ({"tokens": [1], "ids": [[1, 2]], "logprobs": [[3.5, -0.1]]}, "log_softmax"),
        ({"tokens": [1], "ids": [[1, 2]], "logprobs": [[float("nan"), -1.0]]}, "at most 0"),
        ({"tokens": [1, 2], "ids": [[1, 2], [3]], "logprobs": [[-1, -2], [-1]]}, "same k"),
        ({"tokens": [1], "ids": [list(range(65))], "logprobs": [[-1.0] * 65]}, "keep 1 to 64"),
    ],
)
def test_a_malformed_top_k_is_refused_with_the_fix(top, message):
    with pytest.raises(ValidationError, match=message):
        TopKLogprobs.model_validate(top)


def test_top_k_log_probabilities_are_rounded_and_minus_infinity_is_stored_finite(tmp_path):
    # log_softmax may give a tiny positive value for a near-certain token: stored as 0
    top = TopKLogprobs.from_pairs([7], [[(7, 2e-7), (3, -0.123456789), (9, float("-inf"))]])
    assert top.logprobs == [[0.0, -0.1235, MIN_LOGPROB]]
    assert "-0.0" not in top.model_dump_json() and "Infinity" not in top.model_dump_json()
    record_ = generation(1, teacher_top_logprobs=top)
    writer = EscalationLogWriter(tmp_path)
    writer.append([record_])
    writer.close()
    assert list(iter_records(tmp_path, with_top_k=True)) == [record_]


def test_a_20_token_record_with_k_8_stays_under_8_kb():
    """The documented size: at 20 answer tokens and k = 8 over a 49,152-token vocabulary the
    top-k takes under 3 KB of JSON, and a whole chat record with a 600-character article
    opening under 8 KB."""
    opening = "word " * 120  # 600 characters: a BBC article's opening
    messages = [CHAT[0], {"role": "user", "content": opening}]
    line = generation(1, messages=messages).model_dump_json()
    top = top_k(20).model_dump_json()
    assert len(top.encode()) < 3 * 1024
    assert len(line.encode()) < 8 * 1024
    assert len(line.encode()) - len(top.encode()) < len(opening) + 1024  # the rest is small


def test_the_split_key_is_the_canonical_prompt_without_a_template():
    chat = generation(1)
    assert chat.split_text == (
        "system: Write a headline for the article.\n"
        "user: The central bank raised interest rates again on Thursday."
    )
    # the same chat with other spacing, unicode form or role case lands in the same split
    respaced = [
        {"role": "System", "content": "  Write a headline\tfor the article. "},
        {"role": "user", "content": "The central  bank raised\ninterest rates again on Thursday."},
    ]
    assert generation(2, messages=respaced).split_text == chat.split_text
    assert bucket(chat.split_text) == bucket(chat.split_text.upper())  # case folds in the hash
    completion = generation(3, chat=False)
    assert completion.split_text == "Headline: rates rise again."
    assert canonical_prompt("Caf\u00e9") == canonical_prompt("Cafe\u0301")
    # the split function takes either kind's record, or a text
    classified = record(4, text="Some headline")
    for keyed in (chat, completion, classified):
        assert role_of(keyed, 0.5) == role_of(keyed.split_text, 0.5)
    assert classified.split_text == "Some headline"
