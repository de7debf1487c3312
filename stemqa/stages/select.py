"""select: choose what to serve. Every candidate model (base, sft, dpo, quant) answers the dev sets in every mode of
select.modes (each mode's temperature, 'unsure' threshold and PriDe prior fitted on those dev questions); the best
(model, mode) is chosen against the base model in its best mode (stemqa.eval.select: paired bootstrap, 95% interval
above 0). With no trained model better, the base is served, and the summary says so. Writes selection.json, the
chosen mode's mode_params.json (what the serve stage answers with) and the model card (also <run>/model_card.md)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from stemqa.config.schema import StemqaConfig
from stemqa.eval.select import BASE, Selection
from stemqa.stages.base import Stage, StageContext, StageInputError, StageResult, artifact

TRAINED = ("sft", "dpo", "quant")


class SelectInputs(BaseModel):
    models: dict[str, str]  # label (base, sft, dpo, quant) -> model name or directory
    eval_results: dict[str, str] = {}  # label -> the eval stage's results directory (<dir>/<set>/predictions.jsonl)
    index: Optional[str] = None  # RAG index, when eval.use_rag scores the report sets with passages
    training: dict[str, str] = {}  # label -> what it was trained on (the model card's "training data")


class SelectResult(StageResult):
    chosen_model: str
    chosen_mode: str
    trained_beats_base: bool


def _fit_task(model: str, label: str, cfg: StemqaConfig, sets: dict, out_dir: str, num_cpus: float) -> dict:
    from stemqa.eval.fit import fit_on_dev
    from stemqa.eval.run import _set_threads, load_scorer

    _set_threads(num_cpus)
    scorer = load_scorer(model, cfg.select.batch_size, cfg.model.dtype)
    sel = cfg.select
    return fit_on_dev(scorer, sel.modes, sets, out_dir, model=label, prior_questions=sel.prior_questions,
                      wrong_cost=sel.wrong_cost)


class SelectStage(Stage):
    name = "select"
    Inputs = SelectInputs
    description = "choose the (model, answer mode) to serve on dev data, with 95% intervals; write the model card"

    def add_arguments(self, p) -> None:
        p.add_argument("--model", action="append", default=[], metavar="LABEL=MODEL",
                       help="a candidate (repeatable), e.g. sft=runs/x/sft/model; the base model (model.name) is "
                            "always one. Default: the run's models (--run).")

    def inputs_from_args(self, args, ctx: StageContext) -> SelectInputs:
        if ctx.run is not None and not args.model:
            return self.inputs_from_run(ctx)
        models = {BASE: ctx.cfg.model.name}
        for item in args.model:
            label, sep, path = item.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or not path:
                raise StageInputError(f"--model {item!r}: expected LABEL=MODEL, e.g. sft=runs/x/sft/model")
            models[label] = path
        return SelectInputs(models=models)

    def inputs_from_run(self, ctx: StageContext) -> SelectInputs:
        run, cfg = ctx.run, ctx.cfg
        found = {BASE: cfg.model.name, **{s: artifact(run, (s, "model")) for s in TRAINED}}
        wanted = cfg.select.models or [m for m, path in found.items() if path is not None]
        missing = [m for m in wanted if found.get(m) is None]
        if missing:
            raise StageInputError(f"select.models lists {', '.join(missing)}, but this run has no model from "
                                  f"{'that stage' if len(missing) == 1 else 'those stages'}")
        manifest = run.manifest()["stages"]
        evals = manifest.get("eval", {}).get("artifacts", {}) if run.stage_status("eval") == "done" else {}
        training = {s: f"{s} stage: " + json.dumps(manifest[s].get("inputs", {}), sort_keys=True)
                    for s in TRAINED if s in wanted}
        return SelectInputs(models={m: found[m] for m in wanted},
                            eval_results={m: str(run.path / p) for m, p in evals.items() if m in wanted},
                            index=artifact(run, ("rag", "index")), training=training)

    def manifest_inputs(self, inputs: SelectInputs, run) -> dict:
        return {"models": sorted(inputs.models)}

    def run(self, ctx: StageContext, inputs: SelectInputs) -> StageResult:
        import ray

        from stemqa.data.mcq import load_sources
        from stemqa.eval.select import load_candidate, select_best

        cfg, out = ctx.cfg, Path(ctx.out_dir)
        sel_cfg = cfg.select
        if BASE not in inputs.models:
            raise StageInputError("select needs the base model among its candidates (it is the reference)")
        sets = {}
        for s in sel_cfg.dev_sets:
            records, _ = load_sources(s.sources, ctx.data_root, cfg.data.skip_invalid)
            if not records:
                raise StageInputError(f"select.dev_sets {s.name}: no questions (check its sources and split)")
            sets[s.name] = records[:sel_cfg.dev_limit]
        done = ctx.progress.callback("select: models fitted on dev", "models")
        task = ray.remote(num_cpus=1)(_fit_task)
        refs = {label: task.remote(model, label, cfg, sets, str(out / "dev" / label), 1)
                for label, model in inputs.models.items()}
        fitted = {}
        for i, (label, ref) in enumerate(refs.items(), 1):
            fitted[label] = ray.get(ref)
            done(i, len(refs))
        cands = [load_candidate(label, mode, {s: Path(r["dir"]) / s for s in sets}, str(Path(r["dir"]) /
                                                                                        "mode_params.json"))
                 for label, modes in fitted.items() for mode, r in modes.items()]
        selection = select_best(cands, require_significant=sel_cfg.require_significant)
        selection.save(out / "selection.json")
        chosen = selection.chosen
        shutil.copy(chosen.params_path, out / "mode_params.json")
        report = self._score_report(ctx, inputs, selection, out) if sel_cfg.report and cfg.eval.sets else {}
        card = self._card(ctx, inputs, selection, fitted, report, out)
        if ctx.run is not None:
            shutil.copy(card, ctx.run.path / "model_card.md")
        base = selection.base_best
        if selection.trained_beats_base:
            summary = (f"serving {chosen.name}: dev {chosen.accuracy.fmt()} vs base {base.name} "
                       f"{base.accuracy.fmt()}, paired {chosen.vs_base.fmt()}")
        else:
            summary = (f"no trained model beats the base on dev; serving the base model in its best mode, "
                       f"{base.name} (dev {base.accuracy.fmt()})")
        return SelectResult(summary=summary, chosen_model=chosen.model, chosen_mode=chosen.mode,
                            trained_beats_base=selection.trained_beats_base,
                            metrics={"chosen_model": chosen.model, "chosen_mode": chosen.mode,
                                     "chosen_dev_accuracy": chosen.accuracy.value,
                                     "base_best_mode": base.mode, "base_best_dev_accuracy": base.accuracy.value,
                                     "trained_beats_base": selection.trained_beats_base,
                                     "dev_questions": sum(map(len, sets.values())),
                                     **{f"report/{k}": v for k, v in report.items()}},
                            artifacts={"selection": str(out / "selection.json"),
                                       "mode_params": str(out / "mode_params.json"), "model_card": str(card)})

    def _score_report(self, ctx: StageContext, inputs: SelectInputs, sel: Selection, out: Path) -> dict:
        """eval.sets answered by the chosen (model, mode) and the base in its best mode, with dev-fitted params."""
        import functools

        import ray

        from stemqa.eval.modes import ModeParams
        from stemqa.eval.run import evaluate_sets_remote

        retriever = None
        if ctx.cfg.eval.use_rag:
            if not inputs.index:
                raise StageInputError("eval.use_rag is on but this run has no RAG index")
            from stemqa.rag import Retriever

            retriever = functools.partial(Retriever.load, inputs.index)
        refs = {}
        for s in {(sel.chosen.model, sel.chosen.mode, sel.chosen.params_path),
                  (sel.base_best.model, sel.base_best.mode, sel.base_best.params_path)}:
            cfg = ctx.cfg.model_copy(deep=True)
            params = ModeParams.load(s[2])
            cfg.eval.scoring, cfg.eval.mode_params = params.mode, s[2]
            refs[s[:2]] = evaluate_sets_remote(inputs.models[s[0]], cfg, ctx.data_root, out / "report" / s[0] / s[1],
                                               retriever_factory=retriever)
        return {f"{m}/{mode}/{name}": r["accuracy"] for (m, mode), ref in refs.items()
                for name, r in ray.get(ref).items()}

    def _card(self, ctx: StageContext, inputs: SelectInputs, sel: Selection, fitted: dict, report: dict,
              out: Path) -> Path:
        from stemqa.eval.calibration import Calibration
        from stemqa.eval.card import CardInputs, write_model_card
        from stemqa.eval.modes import params_from_config
        from stemqa.eval.select import read_predictions

        cfg = ctx.cfg
        dev_names = [s.name for s in cfg.select.dev_sets]
        report_names = [s.name for s in cfg.eval.sets]
        results: dict = {}
        calibration = {}
        for label, modes in fitted.items():
            for mode, r in modes.items():
                results[(label, mode)] = {s: read_predictions(Path(r["dir"]) / s / "predictions.jsonl")
                                          for s in dev_names}
                calibration[(label, mode)] = Calibration.from_dict(
                    json.loads((Path(r["dir"]) / "calibration.json").read_text()))
        eval_mode = params_from_config(cfg.eval).label()
        for label, d in inputs.eval_results.items():  # the eval stage's figures, in eval.scoring's mode
            for s in report_names:
                if (Path(d) / s / "predictions.jsonl").exists():
                    results.setdefault((label, eval_mode), {})[s] = read_predictions(Path(d) / s / "predictions.jsonl")
        for s in {(sel.chosen.model, sel.chosen.mode), (sel.base_best.model, sel.base_best.mode)}:
            d = out / "report" / s[0] / s[1]
            for name in report_names:
                if (d / name / "predictions.jsonl").exists():
                    results.setdefault(s, {})[name] = read_predictions(d / name / "predictions.jsonl")
        title = f"run {ctx.run.id}" if ctx.run is not None else f"selection in {out}"
        inp = CardInputs(title=title, selection=sel, results=results,
                         set_parts={**{n: "dev" for n in dev_names}, **{n: "report" for n in report_names}},
                         calibration=calibration, training_data={m: [inputs.training.get(m, "")] if m != BASE else []
                                                                 for m in inputs.models},
                         notes=[f"Dev sets: {', '.join(dev_names)} (select.dev_sets, at most "
                                f"{cfg.select.dev_limit or 'all'} questions each); report sets: eval.sets "
                                f"({', '.join(report_names) or 'none'}). The report sets count only when they share "
                                "no question with the training or dev data (sources with split: report)."])
        return write_model_card(out / "model_card.md", inp)


STAGE = SelectStage()
