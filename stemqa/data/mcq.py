"""One MCQ record and loaders for every layout stemqa reads.

Layouts (`format` in the config):
- mmlu_csv: headerless CSV `question,A,B,C,D,answer` (answer a letter); a directory of `<subject>_<split>.csv`.
- hf_jsonl: `{question, choices:[...], answer}` with `answer` an index or a letter (HF / lm-eval layout).
- arc_jsonl: `{id, question:{stem, choices:[{label,text}]}, answerKey}`; labels A-H or 1-5 (ARC, QASC, AI2).
- aqua_jsonl: `{question, options:["A)..", ...], rationale, correct}` (AQuA-RAT).
- records_jsonl: this module's own `MCQ` records, one JSON object per line.

A malformed row raises `MCQFormatError` naming the file and line; with `skip_invalid` it is skipped and
counted in the `LoadReport` (count and the first few reasons). Good rows are never dropped.
"""
from __future__ import annotations

import csv
import io
import json
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

LETTERS = string.ascii_uppercase


class MCQFormatError(ValueError):
    """A row that is not a valid MCQ; the message starts with `file:line:`."""


@dataclass
class MCQ:
    id: str
    subject: str
    question: str
    choices: list[str]
    answer: int  # index into choices
    source: str

    def __post_init__(self):
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError("empty question")
        if not isinstance(self.choices, list) or len(self.choices) < 2:
            raise ValueError(f"needs at least 2 choices, got {len(self.choices) if isinstance(self.choices, list) else self.choices!r}")
        if len(self.choices) > len(LETTERS):
            raise ValueError(f"at most {len(LETTERS)} choices, got {len(self.choices)}")
        for i, c in enumerate(self.choices):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"choice {i} is empty")
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) or not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer!r} is not an index into {len(self.choices)} choices")

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MCQ":
        missing = [k for k in ("id", "subject", "question", "choices", "answer", "source") if k not in d]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}")
        return cls(id=str(d["id"]), subject=d["subject"], question=d["question"], choices=list(d["choices"]),
                   answer=d["answer"], source=d["source"])


@dataclass
class LoadReport:
    path: str
    loaded: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # the first few
    other_split: int = 0  # valid rows left out by `McqSource.split` (they belong to another part)

    def summary(self) -> str:
        s = f"{self.path}: {self.loaded} loaded"
        if self.other_split:
            s += f", {self.other_split} of another split left out"
        if self.skipped:
            s += f", {self.skipped} skipped (first: {'; '.join(self.reasons[:3])})"
        return s


def letter_to_index(answer, n_choices: int, labels: Optional[list[str]] = None) -> int:
    """An answer given as a letter, a label (e.g. '3') or an int index -> index; raises on no such option."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a letter or index")
    if isinstance(answer, int):
        idx = answer
    elif isinstance(answer, str) and labels is not None and answer.strip() in labels:
        idx = labels.index(answer.strip())
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        idx = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, str) and answer.strip().isdigit():
        idx = int(answer.strip())
    else:
        raise ValueError(f"answer {answer!r} is not a letter or index")
    if not 0 <= idx < n_choices:
        raise ValueError(f"answer {answer!r} has no option (only {n_choices} choices)")
    return idx


def _subject_from_stem(path: Path) -> str:
    stem = path.stem
    for suffix in ("_test", "_dev", "_val", "_train", "-test", "-dev", "-train"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    # decoded line by line: one line that is not UTF-8 is that row's error, not the whole file's crash
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, ValueError(f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                yield lineno, ValueError(str(e) if isinstance(e, json.JSONDecodeError) else "nested too deeply")


def _choice_list(value, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"field '{name}' must be a list")
    if len(value) < 2:
        raise ValueError(f"field '{name}' needs at least 2 choices, got {len(value)}")
    return value


def _csv_rows(path: Path) -> Iterator[list[str]]:
    """CSV rows; a file that is not UTF-8 or not CSV (a NUL byte, an endless field) fails naming its line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise MCQFormatError(f"{path}:{line}: not UTF-8 ({e.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise MCQFormatError(f"{path}:{reader.line_num}: not CSV ({e})") from None


def _parse_mmlu_csv(path: Path, source: str, subject: str) -> Iterator[tuple[int, Callable[[], MCQ]]]:
    for lineno, row in enumerate(_csv_rows(path), 1):
        def make(row=row, lineno=lineno):
            if len(row) < 4:
                raise ValueError(f"expected question,choices...,answer; got {len(row)} column(s)")
            question, *choices, answer = row
            return MCQ(f"{source}/{path.stem}/{lineno}", subject, question, choices,
                       letter_to_index(answer, len(choices)), source)
        yield lineno, make


def _need(obj, key: str, where: str = ""):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"missing field '{where}{key}'")
    return obj[key]


def _parse_hf(path: Path, source: str, subject: str):
    for lineno, obj in _jsonl_rows(path):
        def make(obj=obj, lineno=lineno):
            if isinstance(obj, Exception):
                raise ValueError(f"not valid JSON: {obj}")
            choices = _choice_list(_need(obj, "choices"), "choices")
            return MCQ(str(obj.get("id", f"{source}/{lineno}")), obj.get("subject", subject), _need(obj, "question"),
                       choices, letter_to_index(_need(obj, "answer"), len(choices)), source)
        yield lineno, make


def _parse_arc(path: Path, source: str, subject: str):
    for lineno, obj in _jsonl_rows(path):
        def make(obj=obj, lineno=lineno):
            if isinstance(obj, Exception):
                raise ValueError(f"not valid JSON: {obj}")
            q = _need(obj, "question")
            stem = _need(q, "stem", "question.")
            raw = _choice_list(_need(q, "choices", "question."), "question.choices")
            labels = [str(_need(c, "label", "question.choices[].")) for c in raw]
            texts = [_need(c, "text", "question.choices[].") for c in raw]
            key = str(_need(obj, "answerKey"))
            if key not in labels:
                raise ValueError(f"answerKey {key!r} has no option (labels {','.join(labels)})")
            return MCQ(str(obj.get("id", f"{source}/{lineno}")), subject, stem, texts,
                       labels.index(key), source)
        yield lineno, make


def _parse_aqua(path: Path, source: str, subject: str):
    for lineno, obj in _jsonl_rows(path):
        def make(obj=obj, lineno=lineno):
            if isinstance(obj, Exception):
                raise ValueError(f"not valid JSON: {obj}")
            options = _choice_list(_need(obj, "options"), "options")
            choices = []
            for i, opt in enumerate(options):
                if not isinstance(opt, str) or len(opt) < 2 or opt[1] != ")" or opt[0] != LETTERS[i]:
                    raise ValueError(f"option {i} {opt!r} is not '{LETTERS[i]})...'")
                choices.append(opt[2:].strip())
            return MCQ(f"{source}/{lineno}", subject, _need(obj, "question"), choices,
                       letter_to_index(_need(obj, "correct"), len(choices)), source)
        yield lineno, make


def _parse_records(path: Path, source: str, subject: str):
    for lineno, obj in _jsonl_rows(path):
        def make(obj=obj):
            if isinstance(obj, Exception):
                raise ValueError(f"not valid JSON: {obj}")
            if not isinstance(obj, dict):
                raise ValueError("a record must be a JSON object")
            return MCQ.from_dict(obj)
        yield lineno, make


PARSERS = {
    "mmlu_csv": _parse_mmlu_csv,
    "hf_jsonl": _parse_hf,
    "arc_jsonl": _parse_arc,
    "aqua_jsonl": _parse_aqua,
    "records_jsonl": _parse_records,
}


def load_file(path, fmt: str, source: Optional[str] = None, subject: Optional[str] = None,
              skip_invalid: bool = False, limit: Optional[int] = None) -> tuple[list[MCQ], LoadReport]:
    path = Path(path)
    if fmt not in PARSERS:
        raise ValueError(f"unknown MCQ format {fmt!r} (known: {', '.join(PARSERS)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    source = source or path.stem
    subject = subject or _subject_from_stem(path)
    report, records = LoadReport(str(path)), []
    for lineno, make in PARSERS[fmt](path, source, subject):
        if limit is not None and len(records) >= limit:
            break
        try:
            records.append(make())
        except (ValueError, TypeError, KeyError) as e:
            reason = f"{path}:{lineno}: {e}"
            if not skip_invalid:
                raise MCQFormatError(reason) from None
            report.skipped += 1
            if len(report.reasons) < 5:
                report.reasons.append(reason)
    report.loaded = len(records)
    return records, report


def load_source(src, root: Path, skip_invalid: bool = False) -> tuple[list[MCQ], list[LoadReport]]:
    """Load one `McqSource` from the config (a file, or a directory of files of one format)."""
    path = Path(src.path) if Path(src.path).is_absolute() else Path(root) / src.path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".csv", ".jsonl", ".json"))
        if src.subjects:
            files = [p for p in files if _subject_from_stem(p) in set(src.subjects)]
    else:
        files = [path]
    if not files:
        raise FileNotFoundError(f"{path}: no data files")
    split = getattr(src, "split", None)
    records, reports = [], []
    for f in files:
        remaining = None if src.limit is None else src.limit - len(records)
        if remaining is not None and remaining <= 0:
            break
        recs, rep = load_file(f, src.format, source=src.name, subject=src.subject, skip_invalid=skip_invalid,
                              limit=None if split else remaining)
        if split:  # the split first, then the limit: `limit` counts rows of this part
            from stemqa.data.splits import select

            recs, rep.other_split = select(recs, split, root)
            recs = recs[:remaining] if remaining is not None else recs
            rep.loaded = len(recs)
        records += recs
        reports.append(rep)
    return records, reports


def load_sources(sources: Iterable, root: Path, skip_invalid: bool = False) -> tuple[list[MCQ], list[LoadReport]]:
    records, reports = [], []
    for src in sources:
        r, rep = load_source(src, root, skip_invalid)
        records += r
        reports += rep
    return records, reports


def write_records(records: Iterable[MCQ], path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


def read_records(path) -> list[MCQ]:
    return load_file(path, "records_jsonl")[0]
