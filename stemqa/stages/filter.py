"""filter: embed the training pool and the target sets with Ray Data, keep the samples most similar to the
targets (max cosine via FAISS, threshold or top-N). With filter.enabled false every sample is kept."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from stemqa.data.mcq import load_sources, read_records
from stemqa.stages.base import Stage, StageContext, StageResult, artifact, require


class FilterInputs(BaseModel):
    train: Optional[str] = None  # MCQ records JSONL; None = the config's data.train
    targets: dict[str, str] = {}  # target name -> records JSONL; empty = the config's filter.targets


class FilterStage(Stage):
    name = "filter"
    Inputs = FilterInputs
    description = "embed samples with Ray Data and keep those similar to target sets"

    def add_arguments(self, p) -> None:
        p.add_argument("--records", help="MCQ records JSONL to filter (default: data.train from the config)")

    def inputs_from_args(self, args, ctx: StageContext) -> FilterInputs:
        return FilterInputs(train=str(Path(args.records).resolve()) if args.records else None)

    def inputs_from_run(self, ctx: StageContext) -> FilterInputs:
        run = ctx.run
        return FilterInputs(train=require(artifact(run, ("data", "train")), self.name, "data's train records"),
                            targets={t.name: require(artifact(run, ("data", f"target_{t.name}")), self.name,
                                                     f"data's target_{t.name} records")
                                     for t in ctx.cfg.filter.targets})

    def manifest_inputs(self, inputs: FilterInputs, run) -> dict:
        return {"train": super().manifest_inputs(inputs, run).get("train", "data.train")}

    def run(self, ctx: StageContext, inputs: FilterInputs) -> StageResult:
        from stemqa.filter import load_targets, run_filter

        cfg = ctx.cfg
        records = (read_records(inputs.train) if inputs.train
                   else load_sources(cfg.data.train, ctx.data_root, cfg.data.skip_invalid)[0])
        if inputs.targets:
            targets = {name: read_records(path) for name, path in inputs.targets.items()}
        else:
            targets = load_targets(cfg.filter, ctx.data_root, cfg.data.skip_invalid) if cfg.filter.enabled else {}
        res = run_filter(records, targets, cfg.filter, Path(ctx.out_dir),
                         progress=ctx.progress.callback("filter: embed", "texts"))
        artifacts = {key.removesuffix("_path"): res[key] for key in ("kept_path", "scores_path", "histogram",
                                                                      "embeddings") if res[key]}
        return StageResult(summary=f"kept {res['kept']} of {res['total']}", artifacts=artifacts,
                           metrics={"kept": res["kept"], "total": res["total"], "counts": res["counts"]})


STAGE = FilterStage()
