"""Generated blocks in the docs: a command writes its figures between two markers.

    <!-- NAME:begin -->
    ...written by the command, never by hand...
    <!-- NAME:end -->

so a page's tables are what the command last produced, not pasted copies.
"""

from __future__ import annotations

import re
from pathlib import Path


def docs_page(option: str | None, default: str) -> Path | None:
    """The page a command writes its block into: ``option`` when given (``''``: none),
    else ``default`` when it exists under the current folder (run from a checkout)."""
    if option is None:
        return Path(default) if Path(default).is_file() else None
    return Path(option) if option else None


def check_block(page: Path, name: str) -> None:
    """Fail at once, not after a long run, when ``page`` cannot take the block ``name``."""
    _find(page, name)


def replace_block(page: Path, name: str, text: str) -> None:
    """Replace the block ``name`` in ``page`` with ``text`` (the markers must exist)."""
    source, pattern, begin, end = _find(page, name)
    page.write_text(pattern.sub(lambda _: f"{begin}\n{text.strip()}\n{end}", source, count=1))


def _find(page: Path, name: str) -> tuple[str, re.Pattern[str], str, str]:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not page.is_file():
        raise ValueError(f"{page}: no such page for the block {name!r}")
    source = page.read_text()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(source):
        raise ValueError(f"{page} has no block {name!r}: add the lines {begin} and {end}")
    return source, pattern, begin, end
