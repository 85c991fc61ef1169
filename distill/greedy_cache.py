"""A model version's greedy answers, kept on disk by key: a version answers a prompt once
however many runs judge it (the current student's answers to the gate records, the
teacher's to the traffic sample). Keyed by version, so a new version is asked anew."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.generate.generation import SamplingSettings, generate_batch
from serving.generate.models import LanguageModel


@dataclass(frozen=True)
class Greedy:
    """One greedy answer: its text and its tokens' log-probabilities (what scorers read)."""

    text: str
    logprobs: list[float]


class GreedyCache:
    def __init__(
        self, lm: LanguageModel, version: str, cache: Path, max_new_tokens: int, batch_size: int = 8
    ) -> None:
        self.lm, self.version = lm, version
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.asked = 0  # prompts answered now (not from the cache)
        self.seconds = 0.0
        self._path = Path(cache) / version / f"greedy_{max_new_tokens}.jsonl"
        self._known: dict[str, Greedy] = {}
        if self._path.exists():
            for line in self._path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self._known[row["key"]] = Greedy(row["text"], row["logprobs"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line from an interrupted run

    def answers(
        self,
        keys: Sequence[str],
        prompts: Sequence[Sequence[int]],
        settings: Sequence[SamplingSettings] | None = None,
    ) -> list[Greedy]:
        """The answers to ``prompts`` (rendered in this model's tokens), by ``keys``; each
        with its ``settings`` (greedy; default: this cache's ``max_new_tokens``). A key
        names one prompt and its settings (a record id, or a prompt's digest)."""
        default = SamplingSettings(max_new_tokens=self.max_new_tokens)
        each = list(settings) if settings is not None else [default] * len(prompts)
        todo = {
            k: (k, p, s)
            for k, p, s in zip(keys, prompts, each, strict=True)
            if k not in self._known
        }
        groups: dict[tuple[int, tuple[str, ...]], list[tuple[str, Sequence[int]]]] = {}
        for key, prompt, setting in todo.values():
            groups.setdefault((setting.max_new_tokens, tuple(setting.stop)), []).append(
                (key, prompt)
            )
        for (max_new, stop), group in groups.items():
            self._generate(group, SamplingSettings(max_new_tokens=max_new, stop=stop))
        return [self._known[k] for k in keys]

    def _generate(self, todo: list[tuple[str, Sequence[int]]], settings: SamplingSettings) -> None:
        todo.sort(key=lambda item: len(item[1]))  # a batch pads little
        for first in range(0, len(todo), self.batch_size):
            batch = todo[first : first + self.batch_size]
            began = time.perf_counter()
            with torch.inference_mode():
                generated = generate_batch(self.lm, [p for _, p in batch], settings)
            self.seconds += time.perf_counter() - began
            self.asked += len(batch)
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._path, "a") as handle:
                for (key, _), answer in zip(batch, generated, strict=True):
                    self._known[key] = Greedy(answer.text, [float(x) for x in answer.logprobs])
                    row = {"key": key, "text": answer.text, "logprobs": answer.logprobs}
                    handle.write(json.dumps(row) + "\n")
