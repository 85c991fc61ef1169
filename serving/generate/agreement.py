"""Whether a kept answer agrees with the teacher's: ROUGE-L F1 at least a cut.

ROUGE-L F1 is computed with ``rouge-score`` over casefolded Unicode word tokens.
rouge-score's default tokenizer keeps only ``[a-z0-9]``, so every non-Latin answer would
score 0 and always count as disagreeing; ours keeps every word character of any script
and takes each Han, Hiragana or Katakana character as a word of its own (those scripts
write no spaces, so a whole sentence would otherwise be one token). Punctuation and case
never count.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from rouge_score import rouge_scorer

DEFAULT_AGREEMENT_CUT = 0.5

# Han (with extension A and the compatibility block), Hiragana, Katakana
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u309f\u30a0-\u30ff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


class UnicodeWordTokenizer:
    """The tokenizer object rouge-score's ``RougeScorer(tokenizer=...)`` takes."""

    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWordTokenizer())


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F1 of two texts (symmetric). Two texts without a word (both empty, or
    punctuation only) agree fully: 1.0; one without a word against one with: 0.0."""
    tokenize = UnicodeWordTokenizer().tokenize
    if not tokenize(a) and not tokenize(b):
        return 1.0
    return float(_SCORER.score(a, b)["rougeL"].fmeasure)


def agrees(student: str, teacher: str, cut: float = DEFAULT_AGREEMENT_CUT) -> bool:
    """The student's answer agrees with the teacher's: ROUGE-L F1 >= ``cut``."""
    return rouge_l(student, teacher) >= cut


def rouge_l_many(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """:func:`rouge_l` pairwise over two equally long lists: shape (n,)."""
    if len(a) != len(b):
        raise ValueError(f"need two lists of equal length, got {len(a)} and {len(b)}")
    return np.array([rouge_l(x, y) for x, y in zip(a, b, strict=True)], dtype=float)


def agreements(
    students: Sequence[str], teachers: Sequence[str], cut: float = DEFAULT_AGREEMENT_CUT
) -> np.ndarray:
    """:func:`agrees` pairwise: a boolean array (n,)."""
    return rouge_l_many(students, teachers) >= cut
