"""The vocabulary every kind of log record shares: schema versions, kinds, reasons and
teacher statuses.

It sits apart from :mod:`serving.contracts.records` (the classification record, the
writer and the one reader) and :mod:`serving.contracts.generation_records` (the
generation record) so that both import it and neither imports the other's module
in a cycle.
"""

from __future__ import annotations

import math
from typing import Literal

SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
"""Version 1 records carry no inclusion probability: they may train, never evaluate."""

Kind = Literal["classify", "generate"]
"""The task kind a record belongs to; a line without ``kind`` (versions 1-3) is ``classify``."""
KINDS: tuple[Kind, ...] = ("classify", "generate")

Reason = Literal["low_confidence", "audit", "forced"]
TeacherStatus = Literal["answered", "failed", "timeout", "skipped", "cancelled"]
"""Why the teacher fields are filled or empty: ``answered``; the call ``failed`` or hit its
``timeout``; it was ``skipped`` (the bulkhead was full, or an offline audit); or the request
was ``cancelled`` (the client went away, ``request_timeout_s``) while the input waited on it.
Every status but ``answered`` is labelled offline by the distillation job."""


def nan_from_null(value: object) -> object:
    """JSON has no NaN: a NaN confidence (always escalated) is written as null."""
    return math.nan if value is None else value
