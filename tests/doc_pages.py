"""The documentation's pages (README.md and docs/*.md), and a section of them found by its heading on whichever
page holds it, so a test that checks a section keeps checking it when the section moves to another page."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every Markdown heading outside fenced code blocks."""
    found, fence = [], False
    for index, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fence = not fence
        elif not fence and (match := re.match(r"(#{1,6}) (.+)", line)):
            found.append((index, len(match.group(1)), match.group(2).strip()))
    return found


def section(title: str) -> str:
    """The text under the one heading `title` (any level, any page), up to the next heading of its level or above."""
    hits = []
    for page in PAGES:
        text = page.read_text()
        marks = headings(text)
        for i, (index, level, heading) in enumerate(marks):
            if heading == title:
                end = next((later for later, deeper, _ in marks[i + 1:] if deeper <= level), None)
                hits.append("\n".join(text.splitlines()[index + 1:end]))
    assert len(hits) == 1, f"{len(hits)} headings {title!r} in README.md and docs/"
    return hits[0]
