"""BENCHMARKS.md is shared by every benchmark: each one replaces only its own `## ` section."""
from __future__ import annotations

from pathlib import Path

BENCH_MD = Path(__file__).resolve().parent / "BENCHMARKS.md"


def _bounds(text: str, section: str) -> tuple[int, int] | None:
    """(start of the heading line `section`, start of the next `## ` heading or len(text)); None when absent."""
    start = text.find(f"\n{section}\n")
    if start < 0:
        return None
    nxt = text.find("\n## ", start + 1)
    return start + 1, (nxt + 1 if nxt >= 0 else len(text))


def section_text(section: str, path: Path = BENCH_MD) -> str:
    """The body of the section that starts with the line `section`, heading excluded; '' when there is none."""
    text = path.read_text() if path.exists() else ""
    bounds = _bounds(text, section)
    return text[bounds[0] + len(section) + 1:bounds[1]] if bounds else ""


def replace_section(section: str, body: str, path: Path = BENCH_MD) -> None:
    """Replace the section that starts with the line `section` (up to the next `## `) by `body`, which starts
    with that heading; append it when there is none. The file is read right before writing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    body = body.strip("\n") + "\n"
    bounds = _bounds(text, section)
    if bounds is None:
        path.write_text(text.rstrip("\n") + "\n\n" + body)
        return
    start, end = bounds
    path.write_text(text[:start] + body + ("\n" + text[end:] if end < len(text) else ""))
