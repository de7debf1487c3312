"""dpo: DPO (sigmoid / robust / ipo) on Ray Train + DeepSpeed ZeRO from a model (the pipeline: the SFT model),
with the reference log-probs precomputed by a Ray Data job; preference pairs prepared from data.preference
into train/val/test, reward accuracy on each, early stopping."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from stemqa.config.schema import StemqaConfig
from stemqa.stages.base import StageContext, StageResult, TrainStage, artifact
from stemqa.train.loop import TrainHooks


class DPOInputs(BaseModel):
    pairs: str  # directory of train/val/test.jsonl pairs
    base_model: str
    prepare: bool = False  # (re)build `pairs` from data.preference first (also when it has no train.jsonl)
    run_name: str = "dpo"


class DPOReport(BaseModel):
    """What every report of a DPO run carries (a sweep's metric is one of these)."""

    step: int
    train_loss: Optional[float] = None
    val_reward_accuracy: Optional[float] = None
    val_reward_margin: Optional[float] = None
    val_loss: Optional[float] = None
    val_reward_accuracy_best: Optional[float] = None


def prepare(inputs: DPOInputs, ctx: StageContext) -> Optional[dict]:
    """The pairs directory: built from data.preference when asked or missing; its counts, or None if reused."""
    if not inputs.prepare and (Path(inputs.pairs) / "train.jsonl").exists():
        return None
    from stemqa.data.preference import prepare_pairs
    from stemqa.models.loader import load_tokenizer

    return prepare_pairs(ctx.cfg.data.preference, ctx.data_root, load_tokenizer(inputs.base_model), ctx.cfg.dpo,
                         Path(inputs.pairs))["counts"]


class DPOStage(TrainStage):
    name = "dpo"
    Inputs = DPOInputs
    Report = DPOReport
    default_metric = ("val_reward_accuracy_best", "max")
    sweep_columns = ["val_reward_accuracy_before", "test_reward_accuracy", "stopped_early", "best_step"]
    sweep_curve = "val_reward_accuracy"
    description = "DPO (sigmoid/robust/ipo) on Ray Train + DeepSpeed, reference log-probs precomputed"

    def add_arguments(self, p) -> None:
        p.add_argument("--pairs", default=None, help="directory of train/val/test.jsonl preference pairs "
                       "(default: <out>/pairs, built from data.preference)")
        p.add_argument("--prepare", action="store_true", help="first build --pairs from data.preference")
        p.add_argument("--model", default=None, help="model DPO starts from (default: model.name; e.g. an SFT "
                       "model dir)")
        p.add_argument("--name", default="dpo", help="Ray Train run name; the same name resumes (default: dpo)")

    def inputs_from_args(self, args, ctx: StageContext) -> DPOInputs:
        pairs = Path(args.pairs).resolve() if args.pairs else Path(ctx.out_dir) / "pairs"
        return DPOInputs(pairs=str(pairs), base_model=args.model or ctx.cfg.model.name, prepare=args.prepare,
                         run_name=args.name)

    def inputs_from_run(self, ctx: StageContext) -> DPOInputs:
        base = artifact(ctx.run, ("sft", "model")) or ctx.cfg.model.name
        return DPOInputs(pairs=str(ctx.run.stage_dir(self.name) / "pairs"), base_model=base, prepare=True)

    def manifest_inputs(self, inputs: DPOInputs, run) -> dict:
        return {"base_model": super().manifest_inputs(inputs, run)["base_model"]}

    def run(self, ctx: StageContext, inputs: DPOInputs) -> StageResult:
        from stemqa.train.dpo import run_dpo

        counts = prepare(inputs, ctx)
        ref = ctx.progress.callback("dpo: reference log-probs", "pairs")
        res = run_dpo(ctx.cfg, Path(inputs.pairs), Path(ctx.out_dir), inputs.base_model, run_name=inputs.run_name,
                      options=self.options(ctx), ref_progress=ref)
        if counts is not None:
            res.metrics["pairs"] = counts
        m = res.metrics
        summary = (f"reward accuracy: val best {m.get('val_reward_accuracy_best') or float('nan'):.2f}, "
                   f"test {m.get('test_reward_accuracy', float('nan')):.2f}")
        return self.result(res, summary, pairs=inputs.pairs)

    def trial_config(self, cfg: StemqaConfig, hooks: TrainHooks, trial_cpus: float) -> StemqaConfig:
        cfg = super().trial_config(cfg, hooks, trial_cpus)
        # The test split is scored by a Ray Data actor after training; inside a trial it may only use the CPUs
        # the trial's own workers held (they are free by then), or it would wait for CPUs other trials hold.
        res = cfg.dpo.resources
        cfg.dpo.ref_cpus = min(cfg.dpo.ref_cpus, res.num_workers * res.cpus_per_worker)
        return cfg

    def in_process_problem(self, cfg: StemqaConfig) -> Optional[str]:
        # After training, the test split is scored by a Ray Data actor that needs the CPUs the Train workers held.
        # A trial training in its own process holds those CPUs itself until it ends, so with every trial there
        # the actors would wait on each other's trials (Ray Data schedules outside the trial's placement group).
        return ("dpo trials score the test split with a Ray Data actor after training, on the CPUs a trial "
                "training in its own process would still hold")

    def prepare_trials(self, ctx: StageContext, inputs: DPOInputs, sweep=None) -> DPOInputs:
        """The pairs, and their reference log-probs computed now, once, instead of in the first trials."""
        from stemqa.data.preference import SPLITS, read_pairs
        from stemqa.models.loader import resolve_model
        from stemqa.train.dpo import reference_logps

        prepare(inputs, ctx)
        pairs = {s: read_pairs(Path(inputs.pairs) / f"{s}.jsonl") for s in SPLITS}
        ref = resolve_model(ctx.cfg.dpo.reference or inputs.base_model, ctx.cfg.model.revision)
        reference_logps(Path(inputs.pairs), str(ref), pairs, ctx.cfg.dpo,
                        ctx.progress.callback("dpo: reference log-probs", "pairs"))
        return inputs.model_copy(update={"prepare": False, "run_name": "train"})


STAGE = DPOStage()
