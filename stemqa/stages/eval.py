"""eval: MCQ accuracy of one or more models on the eval sets (answer-letter or cloze log-likelihoods, as
lm-eval-harness), one Ray task per model; `--data F --format X` evaluates a file instead of eval.sets."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from stemqa.config.schema import EvalSet, McqSource
from stemqa.data.mcq import PARSERS
from stemqa.stages.base import Stage, StageContext, StageInputError, StageResult, artifact


class EvalInputs(BaseModel):
    models: dict[str, str]  # label -> model; results go to <out>/<label>/<set> ("" = <out>/<set>)
    sets: Optional[list[EvalSet]] = None  # None = the config's eval.sets
    index: Optional[str] = None  # RAG index (eval.use_rag)
    local: bool = False  # in this process instead of Ray tasks


def label_of(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or model)


class EvalResult(StageResult):
    per_set: dict[str, dict[str, dict]] = {}  # label -> set -> metrics.json (for the table; files have them too)


class EvalStage(Stage):
    name = "eval"
    Inputs = EvalInputs
    description = "MCQA accuracy by answer-letter log-likelihood (lm-eval compatible)"

    def add_arguments(self, p) -> None:
        p.add_argument("--model", default=None, help="model name, local dir or .gguf (default: the config's model.name)")
        p.add_argument("--data", default=None, help="an MCQ file to evaluate instead of the config's eval.sets")
        p.add_argument("--format", default="records_jsonl", choices=sorted(PARSERS), help="layout of --data")
        p.add_argument("--scoring", choices=["letter", "cloze"], default=None, help="overrides eval.scoring")
        p.add_argument("--index", default=None, help="RAG index directory (with --set eval.use_rag=true)")
        p.add_argument("--local", action="store_true", help="run in this process instead of as a Ray task")

    def inputs_from_args(self, args, ctx: StageContext) -> EvalInputs:
        if args.scoring:
            ctx.cfg.eval.scoring = args.scoring
        model = args.model or ctx.cfg.model.name
        sets = None
        if args.data:
            path = Path(args.data).resolve()
            if not path.exists():
                raise FileNotFoundError(f"{args.data}: no such file")
            sets = [EvalSet(name=path.stem, sources=[McqSource(path=str(path), format=args.format)])]
        index = args.index or (artifact(ctx.run, ("rag", "index")) if ctx.run is not None else None)
        # with --out the results go straight into it; in a run, under the model's name
        return EvalInputs(models={"" if ctx.run is None else label_of(model): model}, sets=sets, index=index,
                          local=args.local)

    def inputs_from_run(self, ctx: StageContext) -> EvalInputs:
        found = {"base": ctx.cfg.model.name}
        for name in ("sft", "dpo", "quant"):
            found[name] = artifact(ctx.run, (name, "model"))
        missing = [m for m in ctx.cfg.eval.models if found.get(m) is None]
        if missing:
            raise StageInputError(f"eval.models lists {', '.join(missing)}, but this run has no model from "
                             f"{'that stage' if len(missing) == 1 else 'those stages'} (disabled or not in stages)")
        return EvalInputs(models={m: found[m] for m in ctx.cfg.eval.models},
                          index=artifact(ctx.run, ("rag", "index")))

    def manifest_inputs(self, inputs: EvalInputs, run) -> dict:
        return {"models": [m or label_of(p) for m, p in inputs.models.items()]}

    def run(self, ctx: StageContext, inputs: EvalInputs) -> StageResult:
        import ray

        from stemqa.eval.run import evaluate_sets, evaluate_sets_remote

        cfg = ctx.cfg.model_copy(deep=True)
        if inputs.sets is not None:
            cfg.eval.sets = inputs.sets
        retriever = None
        if cfg.eval.use_rag:
            if not inputs.index:
                raise StageInputError("eval.use_rag is on but there is no RAG index (--index, or a run with a rag stage)")
            from stemqa.rag import Retriever

            retriever = functools.partial(Retriever.load, inputs.index)
        out = {label: Path(ctx.out_dir) / label if label else Path(ctx.out_dir) for label in inputs.models}
        if inputs.local:
            results = {label: evaluate_sets(model, cfg, ctx.data_root, out[label], retriever() if retriever else None,
                                            on_progress=ctx.progress.callback(f"eval {label or model}", "questions"))
                       for label, model in inputs.models.items()}
        else:
            refs = {label: evaluate_sets_remote(model, cfg, ctx.data_root, out[label], retriever_factory=retriever,
                                                on_progress=ctx.progress.remote(f"eval {label or label_of(model)}",
                                                                                unit="questions"))
                    for label, model in inputs.models.items()}
            results = {label: ray.get(ref) for label, ref in refs.items()}
        summary = "; ".join(f"{label or label_of(inputs.models[label])}: "
                            + ", ".join(f"{s} {r['accuracy']:.3f}" for s, r in sets.items())
                            for label, sets in results.items())
        metrics = {(f"{label}/{s}" if label else s): r["accuracy"] for label, sets in results.items()
                   for s, r in sets.items()}
        return EvalResult(summary=summary, metrics=metrics, artifacts={label or "results": str(out[label])
                                                                      for label in inputs.models},
                          per_set={label or "results": sets for label, sets in results.items()})

    def show(self, result: EvalResult) -> None:
        for key, sets in result.per_set.items():
            print(table(sets))
            print(f"results: {result.artifacts[key]}")


def table(results: dict) -> str:
    rows = [f"{'set':<16} {'n':>5} {'accuracy':>9} {'q/s':>7}  subjects"]
    for name, m in results.items():
        subjects = ", ".join(f"{s} {v['accuracy']:.2f}" for s, v in m["per_subject"].items())
        rows.append(f"{name:<16} {m['n']:>5} {m['accuracy']:>9.3f} {m['questions_per_s'] or 0:>7.1f}  {subjects}")
    return "\n".join(rows)


STAGE = EvalStage()
