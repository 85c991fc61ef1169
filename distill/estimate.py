"""Estimates over the whole live traffic from the weighted evaluation records.

Each evaluation record was logged with a known probability (1 for an escalation, the
audit fraction for a sampled confident input). Weighted by the inverse of that
probability, the records stand for all served inputs: the ratio form of the
Horvitz-Thompson estimator, ``sum(w * x) / sum(w)``, estimates the mean of ``x`` over the
traffic for any student and threshold (the student is rescored, never read from the log).

Intervals come from a bootstrap over requests (the records of one request are resampled
together); :class:`Bootstrap` draws the resamples once so that two students are compared
on the same draws (a paired bootstrap).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from serving.classify.scorers import get_scorer


@dataclass(frozen=True)
class Estimate:
    """A figure with its two-sided interval at ``level`` and the evidence behind it."""

    value: float
    low: float
    high: float
    level: float
    records: int  # all evaluation records behind it
    sampled: int  # of which sampled confident records (audits, not escalations)

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return (
            f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}] "
            f"({self.sampled} sampled of {self.records} records)"
        )


def ratio(values: np.ndarray, weights: np.ndarray) -> float:
    """The weighted mean ``sum(w * x) / sum(w)`` (the ratio estimator)."""
    total = float(np.sum(weights))
    if total <= 0:
        raise ValueError("no evaluation weight: there are no records to estimate from")
    return float(np.sum(weights * values) / total)


class Bootstrap:
    """Resamples of the records, drawn once and reused for every figure (a paired bootstrap).

    The inputs of one request are logged together and are not independent (one long or odd
    request escalates several at once), so a resample draws *requests* with replacement and
    takes every record of each: ``groups`` gives each record's request (None: one record
    each). Counts are kept per request and the draws are worked in chunks, so no float64
    copy of the whole count matrix is ever made (50,000 records: 100 draws at a time).
    """

    CHUNK = 100

    def __init__(
        self,
        weights: np.ndarray,
        sampled: np.ndarray,
        draws: int = 1000,
        seed: int = 0,
        groups: np.ndarray | None = None,
    ) -> None:
        self.weights = np.asarray(weights, dtype=float)
        self.sampled = np.asarray(sampled, dtype=bool)
        n = len(self.weights)
        if n == 0:
            raise ValueError("no evaluation records")
        if groups is None:
            self.groups = np.arange(n)
        else:
            if len(groups) != n:
                raise ValueError(f"{len(groups)} request groups for {n} records")
            self.groups = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
        self.n_groups = int(self.groups.max()) + 1
        rng = np.random.default_rng(seed)
        # draws x requests resample counts as float32, drawn in chunks so the int64 draws
        # never exist all at once
        p = np.full(self.n_groups, 1.0 / self.n_groups)
        self.counts = np.concatenate(
            [
                rng.multinomial(self.n_groups, p, size=min(self.CHUNK, draws - start)).astype(
                    np.float32
                )
                for start in range(0, draws, self.CHUNK)
            ]
        )
        self._denominators = self._sums(self.weights)

    @property
    def draws(self) -> int:
        return len(self.counts)

    def _sums(self, per_record: np.ndarray) -> np.ndarray:
        """Per draw, the sum of ``per_record`` over the resample (one value per draw)."""
        per_group = np.bincount(self.groups, weights=per_record, minlength=self.n_groups)
        out = np.empty(self.draws)
        for start in range(0, self.draws, self.CHUNK):
            chunk = self.counts[start : start + self.CHUNK].astype(np.float64)
            out[start : start + self.CHUNK] = chunk @ per_group
        return out

    def record_counts(self) -> Iterator[np.ndarray]:
        """Each chunk of draws as a (draws in chunk, records) float64 matrix of how many times
        every record is in the resample (a request's records share its count)."""
        for start in range(0, self.draws, self.CHUNK):
            chunk = self.counts[start : start + self.CHUNK].astype(np.float64)
            yield chunk[:, self.groups]

    def _draws(self, values: np.ndarray) -> np.ndarray:
        return self._sums(self.weights * values) / self._denominators

    def estimate(self, values: np.ndarray, level: float) -> Estimate:
        """The weighted mean of ``values`` (one per record) with a percentile interval."""
        values = np.asarray(values, dtype=float)
        return self.summarise(ratio(values, self.weights), self._draws(values), level)

    def difference(self, a: np.ndarray, b: np.ndarray, level: float) -> Estimate:
        """mean(a) - mean(b) on the same records and the same resamples (paired)."""
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        value = ratio(a, self.weights) - ratio(b, self.weights)
        return self.summarise(value, self._draws(a) - self._draws(b), level)

    def summarise(self, value: float, draws: np.ndarray, level: float) -> Estimate:
        """A figure's value and the percentile interval of its resampled ``draws``."""
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(draws, [tail, 100 - tail])
        return Estimate(
            value=value,
            low=float(low),
            high=float(high),
            level=level,
            records=len(self.weights),
            sampled=int(self.sampled.sum()),
        )


@dataclass(frozen=True)
class CascadeOutcome:
    """Per record, what the cascade with one student at one threshold does."""

    escalated: np.ndarray  # bool
    agrees: np.ndarray  # bool: the cascade's answer is the teacher's
    answer: np.ndarray  # label index the cascade answers


def cascade_outcome(
    student_probs: np.ndarray, teacher_labels: np.ndarray, scorer: str, threshold: float
) -> CascadeOutcome:
    """An escalated input is answered by the teacher (so agrees); a kept one agrees when the
    student's top label is the teacher's."""
    confidence = get_scorer(scorer)(student_probs)
    escalated = ~(confidence >= threshold)  # NaN confidence escalates
    answer = np.where(escalated, teacher_labels, student_probs.argmax(axis=1))
    return CascadeOutcome(escalated, answer == teacher_labels, answer)
