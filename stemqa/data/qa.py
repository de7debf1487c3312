"""Open-ended question/answer records, the SFT data beside harness-format MCQs (`sft.data: qa`).

A record is `{id, question, answer, source}`; the model sees `qa_prompt` and is trained on `qa_target`
(the answer), the prompt masked. Formats:
- qa_jsonl:   one `{question, answer}` object per line (optional `id`, `source`); stemqa's own records too, and
              stemqa's MCQ records (`{question, choices, answer: index}`, what `stemqa data` writes): the answer is
              the right option's text, so MCQ training pools train question -> answer text (the cloze format).
- aqua_jsonl: AQuA-RAT, answer = the worked rationale + "The answer is <the right option>" (the same text
  the AQuA-derived DPO pairs use as `chosen`).
A malformed row raises `QAFormatError` naming the file and line; no row is dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

from stemqa.data.mcq import LETTERS, MCQ, _jsonl_rows


class QAFormatError(ValueError):
    pass


@dataclass(frozen=True)
class QA:
    id: str
    question: str
    answer: str
    source: str = ""


def qa_prompt(qa: QA) -> str:
    return f"Question: {qa.question.strip()}\nAnswer:"


def qa_target(qa: QA) -> str:
    return f" {qa.answer.strip()}"


def _text(obj: dict, key: str) -> str:
    if key not in obj:
        raise ValueError(f"missing field '{key}'")
    if not isinstance(obj[key], str) or not obj[key].strip():
        raise ValueError(f"field '{key}' must be a non-empty string")
    return obj[key]


def qa_from_mcq(q: MCQ) -> QA:
    """An MCQ as question -> the right option's text."""
    return QA(q.id, q.question, q.choices[q.answer], q.source)


def _from_qa(obj: dict, source: str, lineno: int) -> QA:
    if "choices" in obj and not isinstance(obj.get("answer"), str):  # an MCQ record: answer is an option index
        try:
            return qa_from_mcq(MCQ.from_dict({"id": f"{source}/{lineno}", "subject": "", "source": source, **obj}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"an MCQ record, but {e}") from None
    return QA(str(obj.get("id", f"{source}/{lineno}")), _text(obj, "question"), _text(obj, "answer"),
              str(obj.get("source", source)))


def _from_aqua(obj: dict, source: str, lineno: int) -> QA:
    options, correct = obj.get("options"), obj.get("correct")
    if not isinstance(options, list) or len(options) < 2:
        raise ValueError("field 'options' must be a list of at least 2 options")
    if not isinstance(correct, str) or correct.strip() not in LETTERS[:len(options)]:
        raise ValueError(f"correct {correct!r} is not one of the option letters")
    right = options[LETTERS.index(correct.strip())]
    if not isinstance(right, str):
        raise ValueError(f"option {correct!r} is not a string")
    answer = f"{_text(obj, 'rationale').strip()}\nThe answer is {right.strip()}"
    return QA(f"{source}/{lineno}", _text(obj, "question"), answer, source)


PARSERS = {"qa_jsonl": _from_qa, "aqua_jsonl": _from_aqua}


def load_qa_file(path, fmt: str = "qa_jsonl", source: Optional[str] = None,
                 limit: Optional[int] = None) -> list[QA]:
    path = Path(path)
    if fmt not in PARSERS:
        raise ValueError(f"unknown QA format {fmt!r} (known: {', '.join(PARSERS)})")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    source = source or path.stem
    records: list[QA] = []
    for lineno, obj in _jsonl_rows(path):
        if limit is not None and len(records) >= limit:
            break
        try:
            if isinstance(obj, Exception):
                raise ValueError(f"not valid JSON: {obj}")
            if not isinstance(obj, dict):
                raise ValueError("a row must be a JSON object")
            records.append(PARSERS[fmt](obj, source, lineno))
        except ValueError as e:
            raise QAFormatError(f"{path}:{lineno}: {e}") from None
    return records


def write_qa(records: Iterable[QA], path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
            n += 1
    return n
