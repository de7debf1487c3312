"""Fit retrieved passages into the prompt's token budget (counted in the answering model's tokens)."""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from stemqa.data.prompt import passages_block


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def passages_within_budget(passages: Sequence, tokenizer, budget: int, min_tail_tokens: int = 16) -> list:
    """The longest prefix of `passages` (best first) whose rendered context block has at most `budget` tokens.

    The block is measured as `stemqa.data.prompt.passages_block` renders it, so the count is the prompt's.
    A passage that does not fit whole is cut to the tokens left, when at least `min_tail_tokens` are left;
    nothing after it is added.
    """
    kept = []
    for p in passages:
        if _n_tokens(tokenizer, passages_block([q.text for q in kept + [p]])) <= budget:
            kept.append(p)
            continue
        ids = tokenizer(p.text, add_special_tokens=False)["input_ids"]
        used = _n_tokens(tokenizer, passages_block([q.text for q in kept])) if kept else 0
        room = min(len(ids), budget - used)
        # Shrink the cut by the overflow until the rendered block fits: token counts are not additive
        # (the header, the "- " bullet and re-tokenising across the cut all move them a little).
        while room >= min_tail_tokens:
            cut = replace(p, text=tokenizer.decode(ids[:room]).strip())
            over = _n_tokens(tokenizer, passages_block([q.text for q in kept + [cut]])) - budget
            if over <= 0:
                kept.append(cut)
                break
            room -= over
        break
    return kept
