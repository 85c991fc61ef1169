"""A second task that is not BBC: support tickets in three classes, generated texts, a tiny
teacher trained to know them and a tiny seed student that barely does.

Texts mix one or two keywords of their class with filler words; a few carry a keyword of
another class too, so the teacher itself is unsure of some.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml
from tiny_models import build_tiny
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill.finetune import TrainSettings, fine_tune

LABELS = ["billing", "outage", "account"]
KEYWORDS = {
    "billing": ["invoice", "refund", "charge", "payment", "price", "bill", "paid", "money"],
    "outage": ["down", "error", "crash", "offline", "slow", "broken", "fails", "server"],
    "account": ["password", "login", "email", "username", "locked", "profile", "sign", "reset"],
}
FILLER = [
    "please",
    "my",
    "the",
    "a",
    "help",
    "since",
    "yesterday",
    "today",
    "again",
    "urgent",
    "customer",
    "team",
    "hello",
    "thanks",
    "still",
    "not",
    "working",
    "we",
    "our",
    "it",
    "this",
    "that",
    "with",
    "for",
    "on",
    "from",
    "you",
    "can",
    "could",
    "need",
    "now",
]


def ticket(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(LABELS)
    words = rng.sample(KEYWORDS[label], rng.randint(1, 2))
    if rng.random() < 0.15:  # a confusing word of another class
        words.append(rng.choice(KEYWORDS[rng.choice([x for x in LABELS if x != label])]))
    words += rng.sample(FILLER, rng.randint(3, 8))
    rng.shuffle(words)
    return " ".join(words), label


def tickets(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [ticket(rng) for _ in range(n)]


def _train(folder: Path, examples: list[tuple[str, str]], epochs: int, lr: float) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = TrainSettings(epochs=epochs, batch_size=16, lr_encoder=lr, lr_head=lr, seed=0)
    fine_tune(
        model,
        tokenizer,
        [t for t, _ in examples],
        [LABELS.index(label) for _, label in examples],
        settings,
        torch.device("cpu"),
        desc="tiny",
    )
    model.save_pretrained(folder)


def build_ticket_task(root: Path, audit_fraction: float = 0.5) -> Path:
    """Models, traffic, gold and task.yaml under ``root``; returns the task file."""
    teacher = build_tiny(root / "teacher", seed=21, mean_pool=False, labels=LABELS, init=0.02)
    _train(teacher, tickets(600, seed=1), epochs=4, lr=3e-3)
    student = build_tiny(root / "student", seed=22, mean_pool=True, labels=LABELS, init=0.02)
    _train(student, tickets(60, seed=2), epochs=2, lr=2e-3)
    traffic = root / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in tickets(200, seed=3)))
    gold = root / "gold.csv"
    gold.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in tickets(150, seed=4)))
    task = root / "task.yaml"
    task.write_text(
        yaml.safe_dump(
            {
                "name": "tickets",
                "teacher": "teacher",
                "student": "student",
                "traffic": "traffic.jsonl",
                "gold": "gold.csv",
                "workdir": "work",
                "target_agreement": 0.95,
                "audit_fraction": audit_fraction,
            }
        )
    )
    return task


if (
    __name__ == "__main__"
):  # the walk-through in docs/own-task.md: `python tests/ticket_task.py var/tickets`
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "var/tickets")
    out.mkdir(parents=True, exist_ok=True)
    print(f"task file: {build_ticket_task(out, audit_fraction=0.2)}")
