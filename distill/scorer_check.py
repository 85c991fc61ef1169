"""One scorer: the job judges with the scorer the gateway serves with now.

A record's confidence and threshold, and so whether it escalated (its inclusion
probability), come from the gateway's ``cascade.scorer``. Every student is rescored on the
records, so a record logged under an earlier scorer still weighs correctly; what must not
happen is a job that calibrates and judges with one scorer while the gateway derives its
thresholds with another: the figures would look sound and describe a cascade nobody serves.
The gateway's scorer now is the one of the newest evaluation records, so after a deliberate
change (gateway and job changed together) the older records keep counting, and a job left
on the old scorer stops at once, naming both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from distill.splits import Role
from serving.contracts.records import EscalationRecord


class ScorerMismatch(ValueError):
    """The evaluation records were logged under another scorer than the job's."""


NEWEST = 100  # the newest evaluation records tell the gateway's scorer now


def check_scorer(evaluation: Mapping[Role, Iterable[EscalationRecord]], scorer: str) -> None:
    """Raise :class:`ScorerMismatch` (one line) when the newest evaluation records were
    logged with a scorer other than ``scorer`` (the distillation config's)."""
    records = sorted((r for rs in evaluation.values() for r in rs), key=lambda r: r.timestamp)
    found = Counter(r.scorer for r in records[-NEWEST:])
    others = {name: n for name, n in found.items() if name != scorer}
    if not others:
        return
    logged = max(others, key=lambda name: (others[name], name))
    listed = ", ".join(f"{name!r} ({n} of {found.total()})" for name, n in sorted(others.items()))
    raise ScorerMismatch(
        f"the newest evaluation records were logged with scorer {listed}, but this job judges with "
        f"scorer {scorer!r}: set `scorer: {logged}` in the distillation config to match the "
        f"gateway's cascade.scorer, or serve with cascade.scorer: {scorer}"
    )
