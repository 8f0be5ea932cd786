"""Generated blocks of a README: numbers written by the tools, never typed.

A block is the text between ``<!-- NAME:start ... -->`` and ``<!-- NAME:end -->``; the tool
that owns it (``patchbench report --readme`` the headline, ``patchbench models --readme`` the
model zoo) replaces what lies between, atomically, and leaves the rest of the file alone.
"""

from __future__ import annotations

from pathlib import Path

from patchbench.running.atomic import atomic_path
from patchbench.running.results import ResultsError


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start", f"<!-- {name}:end -->"


def find_block(readme: Path, name: str) -> tuple[str, int, int]:
    """The file's text and where block ``name`` starts and ends; ResultsError (one line) if
    the file cannot be read or has no such block, so that a command can check before working."""
    start_marker, end_marker = markers(name)
    try:
        text = readme.read_text()
    except OSError as err:
        raise ResultsError(f"cannot read {readme}: {err.strerror or err}") from None
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ResultsError(f"{readme} has no '{start_marker} -->' ... '{end_marker}' block")
    return text, start, end


def write_block(readme: Path, name: str, command: str, lines: list[str]) -> None:
    """Replace block ``name`` of ``readme`` by ``lines`` (``command`` wrote them)."""
    text, start, end = find_block(readme, name)
    head = f"{markers(name)[0]}: written by `{command}`; do not edit -->"
    with atomic_path(readme) as tmp:
        tmp.write_text(text[:start] + "\n".join([head, *lines]) + text[end:])


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(row) + " |" for row in rows)]
