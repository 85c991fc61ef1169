"""Which logged texts train and which evaluate: a stable hash of the normalised text.

A text's role never changes between runs or machines, and a retried or repeated text
always lands on the same side, so nothing the gate judges was ever trained on. The
evaluation share is cut in two: one half calibrates each version's threshold, the other
judges it (calibrating and judging on the same records would flatter the candidate).

The key is a record's ``split_text``: a classification record's text, a generation
record's canonical prompt (its ``role: content`` lines without the chat template, see
:func:`serving.contracts.generation_records.canonical_prompt`). :func:`role_of` takes
either a text or a record of either kind.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from typing import Literal, Protocol

from serving.contracts.storage import Store

Role = Literal["train", "calibration", "gate"]


class Keyed(Protocol):
    """A record of either kind: what it is split by."""

    @property
    def split_text(self) -> str: ...


SPLIT_NAME = "split.json"


def check_share(store: Store, eval_share: float) -> None:
    """Pin ``eval_share`` to the registry on first use: a later change would move texts
    already trained on into the evaluation splits."""
    pin = json.dumps({"eval_share": eval_share, "rule": "sha256(normalised text)"}).encode()
    if store.create(SPLIT_NAME, pin):
        return
    pinned = float(json.loads(store.read(SPLIT_NAME) or b"{}")["eval_share"])
    if pinned != eval_share:
        raise ValueError(
            f"eval.share={eval_share} differs from {pinned}, the share this registry's "
            f"runs used ({store.uri}/{SPLIT_NAME}): changing it would evaluate on texts "
            "already trained on; keep it, or start a new registry and log"
        )


def normalise(text: str) -> str:
    """Unicode-compatible, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def bucket(text: str) -> float:
    """A number in [0, 1) fixed by the normalised text."""
    digest = hashlib.sha256(normalise(text).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def role_of(key: str | Keyed, eval_share: float) -> Role:
    """``train`` for 1 - eval_share of texts; the rest split evenly between
    ``calibration`` and ``gate``. ``key`` is a text or a record (its ``split_text``)."""
    if not 0.0 <= eval_share < 1.0:
        raise ValueError(f"eval_share must lie in [0, 1), got {eval_share}")
    b = bucket(key if isinstance(key, str) else key.split_text)
    if b >= eval_share:
        return "train"
    return "calibration" if b < eval_share / 2 else "gate"
