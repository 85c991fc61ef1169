"""The teacher's answer to every generation record: as logged, or generated now.

An audited (kept) answer is logged with the student's text only, and an escalation whose
teacher failed, timed out, was skipped or cancelled has empty teacher fields: the job
generates the teacher's answer to those offline, greedily, with the record's own limits
(``max_new_tokens``, stop strings) and the top-k the log would have kept. An answer counts
as ended on its own (the student learns to end its turn there) only when no stop string
was asked: a stop string's cut is the client's. The judge needs
greedy answers on both sides, so a record served with sampling gets its greedy answer
offline too (:meth:`OfflineAnswers.greedy`); training takes the logged answer as it is
(:meth:`OfflineAnswers.answers`). An answer logged by another teacher version is asked
again. Answers are kept per teacher version and record id in the cache, so a record is
generated once however many runs read it: generating offline is the job's largest cost,
and :attr:`OfflineAnswers.seconds` reports it.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.contracts.generation_records import GenerationRecord, TopKLogprobs
from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import LanguageModel, render_chat, render_completion


@dataclass(frozen=True)
class TeacherText:
    """One teacher answer: its text, its tokens and top-k when known (ids of the teacher's
    tokenizer), and whether it ended on its own before its token limit."""

    text: str
    stopped: bool
    top: TopKLogprobs | None = None


class OfflineAnswers:
    def __init__(
        self,
        teacher: LanguageModel,
        version: str,
        cache: Path,
        top_k: int,
        batch_size: int = 8,
    ) -> None:
        self.teacher, self.version, self.top_k, self.batch_size = (
            teacher,
            version,
            top_k,
            batch_size,
        )
        self.asked = 0  # records answered by this job (not from the log or the cache)
        self.seconds = 0.0  # spent generating them
        self._path = Path(cache) / version / "offline_answers.jsonl"
        self._known: dict[str, TeacherText] = {}
        if self._path.exists():
            for line in self._path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    top = TopKLogprobs.model_validate(row["top"]) if row["top"] else None
                    self._known[row["record_id"]] = TeacherText(row["text"], row["stopped"], top)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a torn last line from an interrupted run

    def logged(self, record: GenerationRecord) -> TeacherText | None:
        """The logged answer, if this teacher gave it."""
        if (
            record.teacher_status != "answered"
            or record.teacher_text is None
            or record.teacher_version != self.version
        ):
            return None
        top = record.teacher_top_logprobs
        if top is not None:
            short = len(top.tokens) < record.sampling.max_new_tokens
        else:  # a remote teacher's answer without ids: count its tokens here
            tokens = self.teacher.tokenizer(record.teacher_text, add_special_tokens=False)
            short = len(tokens["input_ids"]) < record.sampling.max_new_tokens
        # short of its limit with no stop string asked: it ended its turn (a stop string's
        # cut is the client's, and must not teach the student to end its turn there)
        return TeacherText(record.teacher_text, short and not record.sampling.stop, top)

    def foreign(self, records: Sequence[GenerationRecord]) -> int:
        """Records answered by another teacher version (asked again here)."""
        return sum(
            r.teacher_status == "answered" and r.teacher_version != self.version for r in records
        )

    def answers(self, records: Sequence[GenerationRecord]) -> list[TeacherText]:
        """For training: the logged answer, else the greedy one generated offline."""
        missing = [r for r in records if self.logged(r) is None]
        known = dict(zip((r.record_id for r in missing), self._generate(missing), strict=True))
        return [self.logged(r) or known[r.record_id] for r in records]

    def greedy(self, records: Sequence[GenerationRecord]) -> list[TeacherText]:
        """For judging: the teacher's greedy answer (logged when the record was greedy)."""

        def usable(r: GenerationRecord) -> TeacherText | None:
            return self.logged(r) if r.sampling.temperature == 0 else None

        missing = [r for r in records if usable(r) is None]
        known = dict(zip((r.record_id for r in missing), self._generate(missing), strict=True))
        return [usable(r) or known[r.record_id] for r in records]

    def _generate(self, records: Sequence[GenerationRecord]) -> list[TeacherText]:
        """Greedy answers, from the cache or generated now in batches of like settings."""
        todo = [r for r in records if r.record_id not in self._known]
        groups: dict[tuple[int, tuple[str, ...]], list[GenerationRecord]] = defaultdict(list)
        for record in todo:
            groups[(record.sampling.max_new_tokens, tuple(record.sampling.stop))].append(record)
        for (max_new, stop), group in groups.items():
            settings = SamplingSettings(max_new_tokens=max_new, stop=stop)
            for first in range(0, len(group), self.batch_size):
                self._answer(group[first : first + self.batch_size], settings)
        return [self._known[r.record_id] for r in records]

    def _answer(self, records: list[GenerationRecord], settings: SamplingSettings) -> None:
        began = time.perf_counter()
        prompts = [self._prompt(r) for r in records]
        with torch.inference_mode():
            generated = generate_batch(self.teacher, prompts, settings, top_k=self.top_k)
        self.seconds += time.perf_counter() - began
        self.asked += len(records)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path, "a") as handle:
            for record, answer in zip(records, generated, strict=True):
                top = None
                if self.top_k and answer.token_ids and answer.top_logprobs:
                    top = TopKLogprobs.from_pairs(answer.token_ids, answer.top_logprobs)
                ended = answer.finish_reason == "stop" and not settings.stop  # its own end
                text = TeacherText(answer.text, ended, top)
                self._known[record.record_id] = text
                row = {
                    "record_id": record.record_id,
                    "text": text.text,
                    "stopped": text.stopped,
                    "top": None if top is None else top.model_dump(),
                }
                handle.write(json.dumps(row) + "\n")

    def _prompt(self, record: GenerationRecord) -> list[int]:
        """The record's prompt in the teacher's tokens (it renders chats itself)."""
        if record.messages is not None:
            chat = [{"role": m.role, "content": m.content} for m in record.messages]
            return render_chat(self.teacher.tokenizer, chat)
        return render_completion(self.teacher.tokenizer, record.prompt or "")
