"""BENCHMARKS.md is shared by every benchmark: each one replaces only its own `## ` section."""
from __future__ import annotations

from pathlib import Path

BENCH_MD = Path(__file__).resolve().parent / "BENCHMARKS.md"


def replace_section(section: str, body: str, path: Path = BENCH_MD) -> None:
    """Replace the section that starts with the line `section` (up to the next `## `) by `body`, which starts
    with that heading; append it when there is none. The file is read right before writing."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    body = body.strip("\n") + "\n"
    start = text.find(f"\n{section}\n")
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + body)
        return
    nxt = text.find("\n## ", start + 1)
    path.write_text(text[:start + 1] + body + ("\n" + text[nxt + 1:] if nxt >= 0 else ""))
