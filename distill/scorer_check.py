"""One scorer: the job judges with the scorer the gateway logged its evaluation records under.

A record's confidence and threshold, and so whether it escalated (its inclusion probability),
come from the gateway's ``cascade.scorer``. Judged with another scorer, the calibration and
the gate would rest on one confidence while the records were drawn by another: the figures
would look sound and be wrong. So the run stops, naming both scorers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from distill.splits import Role
from serving.escalation_log import EscalationRecord


class ScorerMismatch(ValueError):
    """The evaluation records were logged under another scorer than the job's."""


def check_scorer(evaluation: Mapping[Role, Iterable[EscalationRecord]], scorer: str) -> None:
    """Raise :class:`ScorerMismatch` (one line) when any evaluation record was logged with a
    scorer other than ``scorer`` (the distillation config's)."""
    found = Counter(r.scorer for records in evaluation.values() for r in records)
    others = {name: n for name, n in found.items() if name != scorer}
    if not others:
        return
    logged = max(others, key=lambda name: (others[name], name))
    listed = ", ".join(f"{name!r} ({n} of {found.total()})" for name, n in sorted(others.items()))
    raise ScorerMismatch(
        f"the evaluation records were logged with scorer {listed}, but this job judges with "
        f"scorer {scorer!r}: set `scorer: {logged}` in the distillation config to match the "
        f"gateway's cascade.scorer, or serve with cascade.scorer: {scorer}"
    )
