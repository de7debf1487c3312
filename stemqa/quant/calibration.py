"""Calibration data: the harness prompts (with the answer) of a sample of MCQ records, tokenized.

GPTQ and SmoothQuant statistics should come from the same text distribution the model is evaluated on,
so each sample is exactly the evaluator's prompt followed by the gold ` <letter>` target.
"""
from __future__ import annotations

import random
from typing import Sequence

from stemqa.data.mcq import MCQ
from stemqa.data.prompt import harness_prompt, target


def calibration_texts(records: Sequence[MCQ], n: int, seed: int = 0) -> list[str]:
    """Up to `n` records drawn without replacement (seeded), rendered as harness prompt + target."""
    if not records:
        raise ValueError("calibration needs at least one MCQ record, got none")
    picked = list(records) if len(records) <= n else random.Random(seed).sample(list(records), n)
    return [harness_prompt(q) + target(q) for q in picked]


def calibration_dataset(texts: Sequence[str], tokenizer, max_seq_len: int):
    """A `datasets.Dataset` of input_ids/attention_mask, the pre-tokenized form llm-compressor's oneshot takes."""
    from datasets import Dataset

    enc = tokenizer(list(texts), truncation=True, max_length=max_seq_len)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
