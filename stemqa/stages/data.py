"""data: load and validate the MCQ training pool (data.train, or files given) and the filter's target sets,
written as records JSONL. Bad rows fail with file:line (or are counted and skipped with data.skip_invalid)."""
from __future__ import annotations

from pathlib import Path
from pydantic import BaseModel

from stemqa.config.schema import McqSource
from stemqa.data.mcq import PARSERS, load_sources, write_records
from stemqa.stages.base import Stage, StageContext, StageInputError, StageResult


class DataInputs(BaseModel):
    data_root: str
    files: list[McqSource] = []  # given on the command line instead of data.train
    skip_invalid: bool = False


class DataResult(StageResult):
    reports: list[str] = []  # one line per file: rows read, kept, skipped (and the first reasons)


class DataStage(Stage):
    name = "data"
    Inputs = DataInputs
    description = "load and validate MCQ sources; write them as records"
    uses_ray = False

    def add_arguments(self, p) -> None:
        p.add_argument("files", nargs="*", help="files to load instead of the config's data.train")
        p.add_argument("--format", choices=sorted(PARSERS), help="format of the given files")
        p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted) instead of failing")

    def inputs_from_args(self, args, ctx: StageContext) -> DataInputs:
        if args.files and not args.format:
            raise StageInputError("--format is required with files")
        files = [McqSource(path=str(Path(f).resolve()), format=args.format) for f in args.files]
        return DataInputs(data_root=str(ctx.data_root), files=files,
                          skip_invalid=args.skip_invalid or ctx.cfg.data.skip_invalid)

    def inputs_from_run(self, ctx: StageContext) -> DataInputs:
        return DataInputs(data_root=str(ctx.data_root), skip_invalid=ctx.cfg.data.skip_invalid)

    def manifest_inputs(self, inputs: DataInputs, run) -> dict:
        return {"data_root": inputs.data_root, **({"files": [f.path for f in inputs.files]} if inputs.files else {})}

    def run(self, ctx: StageContext, inputs: DataInputs) -> StageResult:
        cfg, root = ctx.cfg, Path(inputs.data_root)
        records, reports = load_sources(inputs.files or cfg.data.train, root, inputs.skip_invalid)
        out = Path(ctx.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_records(records, out / "train.jsonl")
        artifacts = {"train": str(out / "train.jsonl")}
        for t in cfg.filter.targets if not inputs.files else []:
            target, _ = load_sources(t.sources, root, inputs.skip_invalid)
            write_records(target, out / f"target_{t.name}.jsonl")
            artifacts[f"target_{t.name}"] = str(out / f"target_{t.name}.jsonl")
        skipped = sum(r.skipped for r in reports)
        summary = f"{len(records)} MCQs from {len(reports)} files" + (f", {skipped} skipped" if skipped else "")
        return DataResult(summary=summary, metrics={"records": len(records), "skipped": skipped},
                          artifacts=artifacts, reports=[r.summary() for r in reports])

    def show(self, result: "DataResult") -> None:
        for line in result.reports:
            print(line)
        print(f"total: {result.metrics['records']} records")
        if "train" in result.artifacts:
            print(f"wrote {result.artifacts['train']}")


STAGE = DataStage()
