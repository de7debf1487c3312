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
from dataclasses import dataclass
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


def lmeval_arc_yaml() -> Path:
    """The arc_easy task YAML that ships with lm-eval (doc_to_text "Question: {{question}}\\nAnswer:", the option
    texts as choices, acc and acc_norm)."""
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks" / "arc" / "arc_easy.yaml"


def write_lmeval_arc_task(records: Sequence[MCQ], task_dir: Path, name: str = "stemqa_arc") -> str:
    """lm-eval's own arc_easy task, its YAML included unchanged, over `records` written in the hub's ai2_arc layout
    (`{id, question, choices: {text, label}, answerKey}`): only where the data comes from is overridden."""
    task_dir = Path(task_dir).resolve()
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for q in records:
            labels = list(LETTERS[:len(q.choices)])
            f.write(json.dumps({"id": q.id, "question": q.question, "choices": {"text": q.choices, "label": labels},
                                "answerKey": q.answer_letter}, ensure_ascii=False) + "\n")
    task = {"include": str(lmeval_arc_yaml()), "task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "training_split": None, "validation_split": None,
            "test_split": "test"}
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return name


def load_lmeval_model(model_dir: str, batch_size: int = 8, dtype: str = "float32"):
    """lm-eval's own `hf` model (HFLM) on CPU, to time scoring apart from loading."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_dir), dtype=dtype, device="cpu", batch_size=batch_size)


def _arguments(sample: dict) -> list[tuple[str, str]]:
    """(context, continuation) per option of a logged sample (a list, or {"gen_args_i": {arg_0, arg_1}})."""
    args = sample["arguments"]
    if isinstance(args, list):
        return [(a[0], a[1]) for a in args]
    return [(v["arg_0"], v["arg_1"]) for _, v in sorted(args.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]


@dataclass
class LmevalTasks:
    """lm-eval tasks written for some records, and the TaskManager that indexed them (built once, outside any
    timing: it scans lm-eval's several thousand task YAMLs)."""
    parts: dict  # task name -> its records, in the records' order
    task_manager: object


def prepare_lmeval(records: Sequence[MCQ], task_dir: Path, header: bool = True, name: str = "stemqa_mcq",
                   fewshot: Mapping[str, Sequence[MCQ]] | None = None, num_fewshot: int = 0,
                   task: str = "mmlu") -> LmevalTasks:
    """Write the task YAML/JSONL for `records` (see `run_lmeval`) and build lm-eval's TaskManager over them."""
    from lm_eval.tasks import TaskManager

    if task not in ("mmlu", "arc"):
        raise ValueError(f"task must be 'mmlu' (letter, MMLU's prompt) or 'arc' (lm-eval's arc_easy), got {task!r}")
    if task == "arc":
        parts = {name: list(records)}
        write_lmeval_arc_task(records, task_dir, name)
    elif num_fewshot:
        subjects = sorted({q.subject for q in records})
        parts = {f"{name}_{i}": [q for q in records if q.subject == s] for i, s in enumerate(subjects)}
        for (part_name, part), s in zip(parts.items(), subjects):
            write_lmeval_task(part, task_dir, part_name, header, dev=(fewshot or {}).get(s, ()))
    else:
        parts = {name: list(records)}
        write_lmeval_task(records, task_dir, name, header)
    return LmevalTasks(parts, TaskManager(include_path=str(Path(task_dir).resolve())))


def run_lmeval(model_dir: str, records: Sequence[MCQ], task_dir: Path, header: bool = True, batch_size: int = 8,
               name: str = "stemqa_mcq", lm=None, fewshot: Mapping[str, Sequence[MCQ]] | None = None,
               num_fewshot: int = 0, task: str = "mmlu", prepared: LmevalTasks | None = None) -> dict:
    """Run lm-eval (`hf` model, float32, CPU) on `records`; returns per-question lls/contexts/preds and timing.
    With `lm` (from `load_lmeval_model`) that model is used and `time_s` leaves out its loading; with `prepared`
    (from `prepare_lmeval`, same arguments) the task files and TaskManager are not rebuilt inside `time_s`. k-shot
    (`num_fewshot` > 0) takes the first examples of `fewshot[subject]`, one lm-eval task per subject as MMLU.

    Result: {"loglikelihoods": [[ll per option], ...], "contexts": [prompt, ...], "pred": [letter, ...],
    "accuracy": float, "time_s": wall seconds of simple_evaluate}; lists in the order
    of `records`. task "arc": lm-eval's own arc_easy task (cloze, "Question: ..\\nAnswer:"), plus "pred_norm"
    (argmax of ll / option length), lm-eval's per-question "acc_norm" and the scored "continuations".
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data is a local JSONL; never ask the hub
    import lm_eval

    prepared = prepared or prepare_lmeval(records, task_dir, header, name, fewshot, num_fewshot, task)
    parts = prepared.parts
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm if lm is not None else "hf", model_args=None if lm is not None else f"pretrained={model_dir},dtype=float32",
        tasks=list(parts),
        task_manager=prepared.task_manager, batch_size=batch_size,
        device="cpu", log_samples=True, num_fewshot=num_fewshot,
    )
    elapsed = time.perf_counter() - t0
    by_id = {}
    for part_name, part in parts.items():
        samples = sorted(out["samples"][part_name], key=lambda s: s["doc_id"])
        if len(samples) != len(part):
            raise RuntimeError(f"lm-eval returned {len(samples)} samples for {len(part)} records ({part_name})")
        by_id.update({q.id: s for q, s in zip(part, samples)})
    samples = [by_id[q.id] for q in records]
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    pred = [LETTERS[max(range(len(r)), key=r.__getitem__)] for r in lls]
    norm = [[x / len(c) for x, c in zip(r, q.choices)] for r, q in zip(lls, records)]  # lm-eval's acc_norm
    return {
        "loglikelihoods": lls,
        "pred_norm": [LETTERS[max(range(len(r)), key=r.__getitem__)] for r in norm],
        "acc_norm": [float(s["acc_norm"]) for s in samples] if task == "arc" else None,
        "continuations": [[a[1] for a in _arguments(s)] for s in samples],
        "contexts": [_arguments(s)[0][0] for s in samples],
        "pred": pred,
        "accuracy": sum(p == q.answer_letter for p, q in zip(pred, records)) / len(records),
        "time_s": elapsed,
    }
