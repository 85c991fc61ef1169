"""Confidence scorers of the generation kind.

A scorer maps the log-probabilities of the tokens the student emitted (at temperature 1,
from the raw logits; see :mod:`serving.generate.generation`) to a confidence in [0, 1]:
exp of their mean, their minimum, or their 10 % quantile. Higher means trust the student.
An empty answer has no tokens to judge it by: its confidence is NaN, and NaN escalates
(the threshold rule shared by every kind, :mod:`serving.contracts.threshold`).

A sampled answer is scored the same way over its own tokens; thresholds are calibrated on
greedy answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import numpy as np
from pydantic import AfterValidator

Logprobs = Sequence[float] | np.ndarray
Scorer = Callable[[Sequence[Logprobs]], np.ndarray]
"""Takes one array of token log-probabilities an answer and returns confidences (n,)."""

LOW_QUANTILE = 0.1


def _each(answers: Sequence[Logprobs], reduce: Callable[[np.ndarray], float]) -> np.ndarray:
    out = np.full(len(answers), np.nan)
    for i, logprobs in enumerate(answers):
        values = np.asarray(logprobs, dtype=float)
        if values.size:
            out[i] = np.exp(min(reduce(values), 0.0))  # a log-probability is never > 0
    return out


def mean_logprob(answers: Sequence[Logprobs]) -> np.ndarray:
    """exp(mean log-probability): the per-token geometric-mean probability."""
    return _each(answers, lambda v: float(v.mean()))


def min_logprob(answers: Sequence[Logprobs]) -> np.ndarray:
    """exp(min log-probability): the probability of the least likely token."""
    return _each(answers, lambda v: float(v.min()))


def low_quantile(answers: Sequence[Logprobs]) -> np.ndarray:
    """exp of the 10 % quantile of the log-probabilities (linear interpolation): like the
    minimum, but one odd token in a long answer weighs less."""
    return _each(answers, lambda v: float(np.quantile(v, LOW_QUANTILE)))


SCORERS: dict[str, Scorer] = {
    "mean_logprob": mean_logprob,
    "min_logprob": min_logprob,
    "low_quantile": low_quantile,
}


def get_scorer(name: str) -> Scorer:
    """The scorer registered under ``name``; unknown names list the known ones."""
    try:
        return SCORERS[name]
    except KeyError:
        known = ", ".join(sorted(SCORERS))
        raise ValueError(f"unknown generation scorer {name!r}; known scorers: {known}") from None


def known_scorer(name: str) -> str:
    """``name`` if a scorer is registered under it (a validator for config fields)."""
    get_scorer(name)
    return name


ScorerName = Annotated[str, AfterValidator(known_scorer)]
"""A config field holding a registered generation scorer's name."""
