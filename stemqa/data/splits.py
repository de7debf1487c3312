"""The fixed splits of the shared data: which questions choose (dev), which prove (report), which may be trained.

Decided once, here, so that no config can move a question from one side to the other:

- dev (model/mode selection, temperature, the PriDe letter prior, the "unsure" threshold):
  ARC-Easy dev (570), ARC-Challenge dev (299), and `MMLU_DEV_SHARE` of the MMLU STEM even rows.
- report (never trained on, never used for any choice): ARC-Easy test (2,376), `ARC_CHALLENGE_REPORT_SHARE` of
  ARC-Challenge *train* (the shared data has no ARC-Challenge test split; ARC-Challenge dev is the selection set
  and must be labelled so when reported), and `MMLU_REPORT_SHARE` of the MMLU STEM even rows.
- train: everything else (ARC-Easy/Challenge train, AI2 train files, QASC, MMLU even rows of every subject),
  minus any question whose text appears in a dev or report set: the shared files overlap (e.g. 20 AI2 training
  questions are ARC-Easy test questions, 179 are ARC-Challenge train questions), so a training source is
  decontaminated against every held-out set, not only split from its own file.

A question's share is a hash of its normalised text (`share`), so the split is stable across runs, machines and
file orderings. A record is the same question as another when its normalised text and set of options are
(`key`): so a question duplicated across files falls on the same side, and one in both a dev and a report set
counts as dev only (it was seen by selection).

In a config, `McqSource.split` applies this: `train` drops the held-out questions from a source, `dev` /
`report` keep only the source's questions of that part (e.g. the MMLU test directory with `split: dev`).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

from stemqa.data.mcq import MCQ, load_file

Part = Literal["train", "dev", "report"]
PARTS: tuple[Part, ...] = ("train", "dev", "report")

SALT = "stemqa-splits-v1"
MMLU_DEV_SHARE = 0.25
MMLU_REPORT_SHARE = 0.25
ARC_CHALLENGE_REPORT_SHARE = 1 / 3

# The MMLU subjects that count as STEM for the dev/report sets (the qwen3-0.6b preset's eval set).
MMLU_STEM_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
    "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
    "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
)


def normalise(question: str) -> str:
    """Lower case, runs of non-word characters as one space: the same question across files compares equal."""
    return re.sub(r"\W+", " ", question.lower()).strip()


def key(q: MCQ) -> str:
    """What makes two records the same question: the normalised question and its set of normalised options
    (a generic stem such as "Which statement is true?" alone names many different questions)."""
    return normalise(q.question) + "||" + "|".join(sorted(normalise(c) for c in q.choices))


def share(question: str) -> float:
    """A stable number in [0, 1) from the question's normalised text."""
    digest = hashlib.sha256(f"{SALT}\n{normalise(question)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


@dataclass(frozen=True)
class HeldOutSet:
    """A dev or report set: the questions of one file (or directory) that `keep` accepts."""

    name: str
    part: Part
    path: str  # relative to the data root
    format: str
    subject: Optional[str] = None
    subjects: Optional[tuple[str, ...]] = None  # MMLU: only these subject files
    keep: Callable[[MCQ], bool] = lambda q: True
    description: str = ""


def _mmlu_dev(q: MCQ) -> bool:
    return share(q.question) < MMLU_DEV_SHARE


def _mmlu_report(q: MCQ) -> bool:
    return MMLU_DEV_SHARE <= share(q.question) < MMLU_DEV_SHARE + MMLU_REPORT_SHARE


def _arc_challenge_report(q: MCQ) -> bool:
    return share(q.question) < ARC_CHALLENGE_REPORT_SHARE


HELD_OUT: dict[str, HeldOutSet] = {s.name: s for s in (
    HeldOutSet("arc_easy_dev", "dev", "mcq/arc/ARC-Easy-dev.jsonl", "arc_jsonl", "science",
               description="ARC-Easy dev, all 570"),
    HeldOutSet("arc_challenge_dev", "dev", "mcq/arc/ARC-Challenge-dev.jsonl", "arc_jsonl", "science",
               description="ARC-Challenge dev, all 299 (the selection set: reported as such)"),
    HeldOutSet("mmlu_stem_dev", "dev", "mcq/mmlu/test", "mmlu_csv", subjects=MMLU_STEM_SUBJECTS, keep=_mmlu_dev,
               description=f"MMLU STEM even rows with share < {MMLU_DEV_SHARE}"),
    HeldOutSet("arc_easy_test", "report", "mcq/arc/ARC-Easy-test.jsonl", "arc_jsonl", "science",
               description="ARC-Easy test, all 2,376"),
    HeldOutSet("arc_challenge_heldout", "report", "mcq/arc/ARC-Challenge-train.jsonl", "arc_jsonl", "science",
               keep=_arc_challenge_report,
               description=f"ARC-Challenge train with share < {ARC_CHALLENGE_REPORT_SHARE:.3f} (never trained on)"),
    HeldOutSet("mmlu_stem_report", "report", "mcq/mmlu/test", "mmlu_csv", subjects=MMLU_STEM_SUBJECTS,
               keep=_mmlu_report,
               description=f"MMLU STEM even rows with {MMLU_DEV_SHARE} <= share < "
                           f"{MMLU_DEV_SHARE + MMLU_REPORT_SHARE}"),
)}
DEV_SETS = tuple(n for n, s in HELD_OUT.items() if s.part == "dev")
REPORT_SETS = tuple(n for n, s in HELD_OUT.items() if s.part == "report")


def _files(root: Path, s: HeldOutSet) -> list[Path]:
    path = Path(root) / s.path
    if path.is_dir():
        return sorted(p for p in path.glob("*.csv") if s.subjects is None or p.stem.rsplit("_", 1)[0] in s.subjects)
    return [path] if path.is_file() else []


@lru_cache(maxsize=8)
def _registry(root: str) -> dict[str, tuple[Part, str]]:
    """`key` -> (part, set name) over every held-out set whose files exist under `root`."""
    found: dict[str, tuple[Part, str]] = {}
    for part in ("dev", "report"):  # dev first: a text in both stays dev
        for s in HELD_OUT.values():
            if s.part != part:
                continue
            for f in _files(Path(root), s):
                for q in load_file(f, s.format, subject=s.subject)[0]:
                    if s.keep(q):
                        found.setdefault(key(q), (part, s.name))
    return found


def part_of(q: MCQ, root: Path) -> Part:
    """The part a question belongs to under the data root `root` (train when in no held-out set)."""
    return _registry(str(Path(root).resolve())).get(key(q), ("train", ""))[0]


def select(records: Sequence[MCQ], part: Part, root: Path) -> tuple[list[MCQ], int]:
    """The records of `part`, and how many others were left out."""
    if part not in PARTS:
        raise ValueError(f"split {part!r}: must be one of {', '.join(PARTS)}")
    kept = [q for q in records if part_of(q, root) == part]
    return kept, len(records) - len(kept)


def load_held_out(name: str, root: Path) -> list[MCQ]:
    """The questions of one named dev/report set (`HELD_OUT`), in file order; dev wins over report on overlap."""
    if name not in HELD_OUT:
        raise ValueError(f"unknown held-out set {name!r} (known: {', '.join(HELD_OUT)})")
    s = HELD_OUT[name]
    files = _files(Path(root), s)
    if not files:
        raise FileNotFoundError(f"{Path(root) / s.path}: not found (held-out set {name})")
    out = []
    for f in files:
        out += [q for q in load_file(f, s.format, source=name, subject=s.subject)[0]
                if s.keep(q) and part_of(q, root) == s.part]
    return out
