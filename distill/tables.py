"""Read a task's text files: JSON lines, CSV or Parquet, with a text column (and labels).

Every problem is one line that names the file and what to change, raised as
:class:`TableError`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

SUFFIXES = (".jsonl", ".csv", ".parquet")


class TableError(ValueError):
    """A text file that cannot be used; the message names the file and the fix."""


def read_rows(path: Path, columns: list[str]) -> list[dict[str, str]]:
    """Rows of ``path`` holding at least ``columns`` (non-empty strings), in file order."""
    path = Path(path)
    rows = read_file(path, f"at least one {columns[0]!r}")
    for column in columns:
        if column not in rows[0]:
            found = ", ".join(map(str, rows[0])) or "none"
            raise TableError(f"{path}: no {column!r} column (columns found: {found})")
    for number, row in enumerate(rows, start=1):
        for column in columns:
            value = row.get(column)
            if not isinstance(value, str) or not value.strip():
                raise TableError(f"{path}: row {number} has no text in column {column!r}")
    return [{c: str(row[c]) for c in columns} for row in rows]


def read_file(path: Path, needs: str) -> list[dict[str, object]]:
    """The rows of a JSON-lines, CSV or Parquet file that must hold ``needs`` (named in the
    error when it holds no row); every problem a :class:`TableError` naming the file."""
    if not path.is_file():
        raise TableError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise TableError(f"{path}: unknown format {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        rows = read_table(path, suffix)
    except UnicodeDecodeError:
        raise TableError(f"{path}: not UTF-8 text; re-save it as UTF-8") from None
    if not rows:
        raise TableError(f"{path}: no rows; it must hold {needs}")
    return rows


def read_table(path: Path, suffix: str) -> list[dict[str, object]]:
    """The rows of a JSON-lines, CSV or Parquet file, as dictionaries."""
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix == ".csv":  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return list(csv.DictReader(handle))
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return list(pq.read_table(path).to_pylist())
    except (pyarrow.ArrowException, OSError) as exc:
        raise TableError(f"{path}: not a readable Parquet file ({exc})") from None


def _jsonl(path: Path) -> list[dict[str, object]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TableError(f"{path}: line {number} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise TableError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def read_texts(path: Path, column: str = "text") -> list[str]:
    return [row[column] for row in read_rows(path, [column])]


def read_labelled(
    path: Path, labels: list[str], text: str = "text", label: str = "label"
) -> tuple[list[str], list[int]]:
    """(texts, label indices); a label outside ``labels`` is an error naming it."""
    rows = read_rows(path, [text, label])
    index = {name: i for i, name in enumerate(labels)}
    for number, row in enumerate(rows, start=1):
        if row[label] not in index:
            raise TableError(
                f"{path}: row {number} has label {row[label]!r}, which is not one of the "
                f"teacher's labels {labels}"
            )
    return [r[text] for r in rows], [index[r[label]] for r in rows]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
