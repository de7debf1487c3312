"""sft: supervised fine-tuning (full or LoRA) on Ray Train + DeepSpeed ZeRO, on harness-format MCQs (sft.data:
mcq) or open-ended answers (sft.data: qa); loss on the completion only. Re-running into the same directory with
the same --name resumes from the last checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from stemqa.data import mcq, qa
from stemqa.stages.base import StageContext, StageInputError, StageResult, TrainStage, artifact, require


class SFTInputs(BaseModel):
    train: str  # records JSONL (sft.data: mcq) or {question, answer} JSONL (sft.data: qa)
    base_model: str
    run_name: str = "sft"  # Ray Train run name: the same name in the same directory resumes


class SFTReport(BaseModel):
    """What every report of an SFT run carries (a sweep's metric is one of these)."""

    step: int
    train_loss: Optional[float] = None
    eval_loss: Optional[float] = None


def training_file(path: Optional[str], fmt: Optional[str], sft_data: str, ctx: StageContext) -> str:
    """The file SFT reads, in stemqa's own layout: a given file (converted from `fmt` when it has another
    layout), else the config's data.train written as records."""
    native = "records_jsonl" if sft_data == "mcq" else "qa_jsonl"
    out = Path(ctx.out_dir) / "train.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    if path is None:
        if sft_data != "mcq":
            raise StageInputError("sft.data=qa needs a training file (--data F [--format qa_jsonl|aqua_jsonl])")
        records, _ = mcq.load_sources(ctx.cfg.data.train, ctx.data_root, ctx.cfg.data.skip_invalid)
        if not records:
            raise StageInputError("data.train gives no records to train on")
        mcq.write_records(records, out)
        return str(out)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such training file")
    if (fmt or native) == native:
        return str(Path(path).resolve())
    if sft_data == "mcq":
        mcq.write_records(mcq.load_file(path, fmt, skip_invalid=ctx.cfg.data.skip_invalid)[0], out)
    else:
        qa.write_qa(qa.load_qa_file(path, fmt), out)
    return str(out)


class SFTStage(TrainStage):
    name = "sft"
    Inputs = SFTInputs
    Report = SFTReport
    default_metric = ("eval_loss", "min")
    sweep_columns = ["eval_loss_before", "train_loss_last", "tokens_per_s"]
    sweep_curve = "eval_loss"
    description = "supervised fine-tuning (full or LoRA) on Ray Train + DeepSpeed"

    def add_arguments(self, p) -> None:
        p.add_argument("--data", "--train", dest="data", default=None,
                       help="training file (default: the config's data.train): MCQs, or {question, answer} rows "
                       "with sft.data=qa")
        p.add_argument("--format", default=None, choices=sorted({*mcq.PARSERS, *qa.PARSERS}),
                       help="layout of --data (default: records_jsonl, or qa_jsonl with sft.data=qa)")
        p.add_argument("--model", default=None, help="model to fine-tune (default: model.name from the config)")
        p.add_argument("--name", default="sft", help="Ray Train run name; the same name resumes (default: sft)")

    def inputs_from_args(self, args, ctx: StageContext) -> SFTInputs:
        return SFTInputs(train=training_file(args.data, args.format, ctx.cfg.sft.data, ctx),
                         base_model=args.model or ctx.cfg.model.name, run_name=args.name)

    def inputs_from_run(self, ctx: StageContext) -> SFTInputs:
        train = artifact(ctx.run, ("filter", "kept"), ("data", "train"))
        return SFTInputs(train=require(train, self.name, "training records (filter.kept or data.train)"),
                         base_model=ctx.cfg.model.name)

    def manifest_inputs(self, inputs: SFTInputs, run) -> dict:
        return {k: v for k, v in super().manifest_inputs(inputs, run).items() if k != "run_name"}

    def sweep_problem(self, cfg, sweep) -> Optional[str]:
        if sweep.metric == "eval_loss" and cfg.sft.eval_fraction == 0:
            return "metric eval_loss needs a held-out share (sft.eval_fraction > 0)"
        return super().sweep_problem(cfg, sweep)

    def run(self, ctx: StageContext, inputs: SFTInputs) -> StageResult:
        from stemqa.train.sft import run_sft

        res = run_sft(ctx.cfg, Path(inputs.train), Path(ctx.out_dir), base_model=inputs.base_model,
                      run_name=inputs.run_name, options=self.options(ctx))
        m = res.metrics
        return self.result(res, f"loss {m.get('train_loss_first') or float('nan'):.3f} -> "
                                f"{m.get('train_loss_last') or float('nan'):.3f}")


STAGE = SFTStage()
