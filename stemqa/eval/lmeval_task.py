"""A local lm-eval-harness task over our own records, to check agreement with lm-eval and to benchmark it.

lm-eval's MMLU tasks download `cais/mmlu` from the HF hub, which these machines cannot reach. This writes the
records as JSONL and a task YAML that reads it with the `json` dataset builder, with MMLU's prompt
(`description` = subject header, `doc_to_text` = question + lettered options + `Answer:`, letter choices,
`target_delimiter " "`), generalised to any number of options. lm-eval is a test/benchmark dependency:
it is imported only inside `run_lmeval`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from stemqa.data.mcq import LETTERS, MCQ

HEADER = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
DOC_TO_TEXT = ("{{question.strip()}}{% for c in choices %}\n" + "{{'" + LETTERS + "'[loop.index0]}}. {{c}}"
               "{% endfor %}\nAnswer:")
DOC_TO_CHOICE = "{{'" + LETTERS + "'[:choices|length]|list}}"


def _write_jsonl(path: Path, records: Sequence[MCQ]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for q in records:
            f.write(json.dumps({"id": q.id, "subject": q.subject, "question": q.question, "choices": q.choices,
                                "answer": q.answer}, ensure_ascii=False) + "\n")


def write_lmeval_task(records: Sequence[MCQ], task_dir: Path, name: str = "stemqa_mcq", header: bool = True,
                      dev: Sequence[MCQ] = ()) -> str:
    """Write <task_dir>/<name>.jsonl and <name>.yaml; returns the task name for `simple_evaluate(tasks=[...])`.
    `dev`: the k-shot pool, taken in order (MMLU's `fewshot_split: dev` with the `first_n` sampler)."""
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    _write_jsonl(data, records)
    files = {"test": str(data)}
    if dev:
        files["dev"] = str(task_dir / f"{name}.dev.jsonl")
        _write_jsonl(Path(files["dev"]), dev)
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": DOC_TO_TEXT,
        "doc_to_choice": DOC_TO_CHOICE,
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if dev:
        task.update(fewshot_split="dev", fewshot_config={"sampler": "first_n"})
    if header:
        task["description"] = HEADER
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return name


def load_lmeval_model(model_dir: str, batch_size: int = 8):
    """lm-eval's own `hf` model (HFLM), float32 on CPU, to time scoring apart from loading."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch_size)


def run_lmeval(model_dir: str, records: Sequence[MCQ], task_dir: Path, header: bool = True, batch_size: int = 8,
               name: str = "stemqa_mcq", lm=None, fewshot: Mapping[str, Sequence[MCQ]] | None = None,
               num_fewshot: int = 0) -> dict:
    """Run lm-eval (`hf` model, float32, CPU) on `records`; returns per-question lls/contexts/preds and timing.
    With `lm` (from `load_lmeval_model`) that model is used and `time_s` leaves out its loading. k-shot
    (`num_fewshot` > 0) takes the first examples of `fewshot[subject]`, one lm-eval task per subject as MMLU.

    Result: {"loglikelihoods": [[ll per option], ...], "contexts": [prompt, ...], "pred": [letter, ...],
    "accuracy": float, "time_s": wall seconds of simple_evaluate (model load included)}; lists in the order
    of `records`.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data is a local JSONL; never ask the hub
    import lm_eval
    from lm_eval.tasks import TaskManager

    if num_fewshot:
        subjects = sorted({q.subject for q in records})
        parts = {f"{name}_{i}": [q for q in records if q.subject == s] for i, s in enumerate(subjects)}
        for (task, part), s in zip(parts.items(), subjects):
            write_lmeval_task(part, task_dir, task, header, dev=(fewshot or {}).get(s, ()))
    else:
        parts = {name: list(records)}
        write_lmeval_task(records, task_dir, name, header)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm if lm is not None else "hf", model_args=None if lm is not None else f"pretrained={model_dir},dtype=float32",
        tasks=list(parts),
        task_manager=TaskManager(include_path=str(Path(task_dir).resolve())), batch_size=batch_size,
        device="cpu", log_samples=True, num_fewshot=num_fewshot,
    )
    elapsed = time.perf_counter() - t0
    by_id = {}
    for task, part in parts.items():
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        if len(samples) != len(part):
            raise RuntimeError(f"lm-eval returned {len(samples)} samples for {len(part)} records ({task})")
        by_id.update({q.id: s for q, s in zip(part, samples)})
    samples = [by_id[q.id] for q in records]
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    pred = [LETTERS[max(range(len(r)), key=r.__getitem__)] for r in lls]
    return {
        "loglikelihoods": lls,
        "contexts": [s["arguments"][0][0] if isinstance(s["arguments"], list) else s["arguments"]["gen_args_0"]["arg_0"]
                     for s in samples],
        "pred": pred,
        "accuracy": sum(p == q.answer_letter for p, q in zip(pred, records)) / len(records),
        "time_s": elapsed,
    }
