"""quant: quantize a model (GPTQ, SmoothQuant+GPTQ, int8 weight-only, bitsandbytes, QAT) as a Ray task,
calibrated on SFT data; lm_head stays in full precision. With eval sets among its inputs (a sweep's trials) it
also scores the quantized model on them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from stemqa.config.schema import StemqaConfig
from stemqa.data.mcq import PARSERS, load_file, load_sources, read_records, write_records
from stemqa.stages.base import Stage, StageContext, StageInputError, StageResult, artifact
from stemqa.train.loop import TrainHooks


class QuantInputs(BaseModel):
    model: str
    calibration: Optional[str] = None  # MCQ records JSONL; None = the config's data.train
    eval_sets: dict[str, str] = {}  # set name -> records JSONL to score the quantized model on (sweeps)
    model_dir: Optional[str] = None  # where the model goes; None = <stage dir>/model (--out DIR: DIR itself)


class QuantReport(BaseModel):
    """What a quantization trial reports (a sweep's metric is one of these)."""

    accuracy: float
    size_mb: float
    wall_s: float


class QuantStage(Stage):
    name = "quant"
    Inputs = QuantInputs
    Report = QuantReport
    default_metric = ("accuracy", "max")
    sweep_columns = ["size_mb", "wall_s", "calibration_samples"]
    description = "quantize a model (GPTQ, SmoothQuant+GPTQ, bitsandbytes, int8, QAT)"

    def add_arguments(self, p) -> None:
        p.add_argument("--model", default=None, help="model to quantize (default: model.name of the config)")
        p.add_argument("--calib", default=None, help="MCQ file for calibration (default: the config's data.train)")
        p.add_argument("--calib-format", default="records_jsonl", choices=sorted(PARSERS),
                       help="layout of --calib (default: records_jsonl, as written by `stemqa data`/filter)")

    def inputs_from_args(self, args, ctx: StageContext) -> QuantInputs:
        calib = None
        if args.calib:  # checked here, naming the bad row; records are read as they are, other layouts converted
            records, _ = load_file(args.calib, args.calib_format, skip_invalid=ctx.cfg.data.skip_invalid)
            calib = str(Path(args.calib).resolve())
            if args.calib_format != "records_jsonl":
                calib = str(Path(ctx.out_dir) / "calibration.jsonl")
                write_records(records, calib)
        return QuantInputs(model=args.model or ctx.cfg.model.name, calibration=calib,
                           model_dir=str(Path(args.out).resolve()) if args.out else None)

    def inputs_from_run(self, ctx: StageContext) -> QuantInputs:
        model = artifact(ctx.run, ("dpo", "model"), ("sft", "model")) or ctx.cfg.model.name
        return QuantInputs(model=model, calibration=artifact(ctx.run, ("filter", "kept"), ("data", "train")))

    def manifest_inputs(self, inputs: QuantInputs, run) -> dict:
        return {k: v for k, v in super().manifest_inputs(inputs, run).items() if k in ("model", "calibration")}

    def run(self, ctx: StageContext, inputs: QuantInputs) -> StageResult:
        from stemqa.quant import quantize_remote

        cfg = ctx.cfg
        if inputs.calibration:
            pool = read_records(inputs.calibration)
        else:
            pool = load_sources(cfg.data.train, ctx.data_root, cfg.data.skip_invalid)[0]
        # quantize draws quant.calibration_samples of the pool (seeded by quant.seed)
        res = quantize_remote(cfg.quant, inputs.model, pool, Path(inputs.model_dir or Path(ctx.out_dir) / "model"))
        metrics = {k: v for k, v in res.items() if k != "model_dir"}
        if inputs.eval_sets:
            metrics.update(self._evaluate(cfg, res["model_dir"], inputs.eval_sets, Path(ctx.out_dir) / "eval"))
        summary = f"{res['method']} {res.get('bits', '')}-bit, {res.get('size_mb', 0):.0f} MB in {res.get('wall_s', 0):.0f} s"
        return StageResult(summary=summary, metrics=metrics, artifacts={"model": res["model_dir"]})

    @staticmethod
    def _evaluate(cfg: StemqaConfig, model_dir: str, sets: dict[str, str], out: Path) -> dict:
        import ray

        from stemqa.eval.run import evaluate_remote

        accs = {}
        for name, path in sets.items():  # one after another: each task holds quant.num_cpus
            accs[name] = ray.get(evaluate_remote(model_dir, read_records(path), out / name, num_cpus=cfg.quant.num_cpus,
                                                 scoring=cfg.eval.scoring, batch_size=cfg.eval.batch_size,
                                                 header=cfg.eval.subject_header))["accuracy"]
        return {**{f"accuracy_{k}": v for k, v in accs.items()}, "accuracy": sum(accs.values()) / len(accs)}

    # ---- sweeps: each trial quantizes (a Ray task) and scores eval.sets (Ray tasks), one after another
    def trial_cpus(self, cfg: StemqaConfig, trial_cpus: float) -> tuple[float, float]:
        return trial_cpus, cfg.quant.num_cpus

    def prepare_trials(self, ctx: StageContext, inputs: QuantInputs, sweep=None) -> QuantInputs:
        cfg, out = ctx.cfg, Path(ctx.out_dir)
        if not cfg.eval.sets:
            raise StageInputError("eval.sets is empty: a quant sweep scores each quantized model on them")
        limit = sweep.eval_limit if sweep is not None else None
        sets = {}
        for s in cfg.eval.sets:
            records, _ = load_sources(s.sources, ctx.data_root, cfg.data.skip_invalid)
            sets[s.name] = str(out / f"eval_{s.name}.jsonl")
            write_records(records[:limit], sets[s.name])
        calibration = inputs.calibration
        if calibration is None:
            calibration = str(out / "calib.jsonl")
            write_records(load_sources(cfg.data.train, ctx.data_root, cfg.data.skip_invalid)[0], calibration)
        return inputs.model_copy(update={"calibration": calibration, "eval_sets": sets})

    def trial_config(self, cfg: StemqaConfig, hooks: TrainHooks, trial_cpus: float) -> StemqaConfig:
        return cfg


STAGE = QuantStage()
