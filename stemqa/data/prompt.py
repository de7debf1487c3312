"""The evaluation ("harness") prompt, exactly as lm-eval-harness's MMLU task renders it.

    The following are multiple choice questions (with answers) about college physics.\n\n
    <question>\nA. <choice>\nB. <choice>\n...\nAnswer:

The target is the letter with a leading space (lm-eval's `target_delimiter " "`). k-shot examples come
first, each rendered the same way followed by ` <letter>\n\n`. Retrieved passages, when given, go before the
question block.
"""
from __future__ import annotations

from typing import Optional, Sequence

from stemqa.data.mcq import LETTERS, MCQ


def subject_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_block(q: MCQ) -> str:
    lines = [q.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer:"


def passages_block(passages: Sequence[str]) -> str:
    if not passages:
        return ""
    return "Context:\n" + "\n".join(f"- {p.strip()}" for p in passages) + "\n\n"


def harness_prompt(q: MCQ, fewshot: Sequence[MCQ] = (), header: bool = True,
                   passages: Optional[Sequence[str]] = None) -> str:
    """The prompt ending in `Answer:`; the model's next token should be ` <letter>`."""
    out = subject_header(q.subject) if header else ""
    for ex in fewshot:
        out += question_block(ex) + f" {ex.answer_letter}\n\n"
    out += passages_block(passages or [])
    return out + question_block(q)


def target(q: MCQ) -> str:
    return f" {q.answer_letter}"
