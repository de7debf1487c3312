"""The main job: every stage of stemqa as real Ray work, in order, into one run directory.

    data -> filter (Ray Data) -> sft (Ray Train + DeepSpeed) -> dpo (Ray Train + DeepSpeed) -> quant (Ray task)
    -> rag index (Ray Data + FAISS) -> eval (Ray tasks) -> serve (Ray Serve) and one question over HTTP

Run it as `stemqa pipeline --preset demo` (connects to the local cluster from cluster/local.sh when it runs,
else starts a private Ray) or `ray job submit --working-dir . -- python -m jobs.pipeline --preset demo`.
Every stage records its inputs, config, artifacts and metrics in <run>/manifest.json. `--run <dir>` resumes a
run: stages already done are not run again.
"""
from __future__ import annotations

import functools
import json
import os
import random
import time
from pathlib import Path

from jobs.common import config_from, connect, open_run, parser
from stemqa.data.mcq import load_sources, read_records, write_records
from stemqa.data.paths import data_root
from stemqa.tracking import end_run, log_stage, mark_failed, open_stage

def main(argv=None) -> int:
    p = parser("stemqa pipeline", __doc__)
    p.add_argument("--no-serve", action="store_true", help="stop after evaluation (no Serve app)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    root = data_root(cfg.data.root)
    address = connect(cfg)
    run = open_run(args, cfg)
    print(f"run {run.id} at {run.path}\nray {address}; data from {root}")
    timings: dict[str, tuple[float, str]] = {}

    def stage(name, fn, inputs=None, config=None, live=False):
        """Run a stage once: skipped when the manifest says it is done (resume). The stage's tracker runs are
        opened first; with live=True `fn(rec, target)` gets them, for its Train workers to log each step."""
        if run.stage_status(name) == "done":
            timings[name] = (0.0, "done earlier (resumed)")
            return run.manifest()["stages"][name]
        print(f"[{name}] ...", flush=True)
        t0 = time.time()
        target = open_stage(run, name, cfg.tracking, config)
        try:
            with run.stage(name, inputs=inputs, config=config) as rec:
                summary = fn(rec, target) if live else fn(rec)
        except BaseException:
            mark_failed(target)
            end_run(run, cfg.tracking, "FAILED")
            raise
        log_stage(run, name, run.manifest()["stages"][name]["metrics"], cfg.tracking, config, target)
        timings[name] = (time.time() - t0, summary)
        print(f"[{name}] {summary} ({timings[name][0]:.0f} s)", flush=True)
        return run.manifest()["stages"][name]

    # 1. data: load and validate the training pool and the filter targets
    def do_data(rec):
        records, reports = load_sources(cfg.data.train, root, cfg.data.skip_invalid)
        write_records(records, rec.dir / "train.jsonl")
        rec.add_artifact("train", rec.dir / "train.jsonl")
        for t in cfg.filter.targets:
            target, _ = load_sources(t.sources, root, cfg.data.skip_invalid)
            write_records(target, rec.dir / f"target_{t.name}.jsonl")
            rec.add_artifact(f"target_{t.name}", rec.dir / f"target_{t.name}.jsonl")
        skipped = sum(r.skipped for r in reports)
        rec.add_metrics(records=len(records), skipped=skipped)
        return f"{len(records)} MCQs from {len(reports)} files" + (f", {skipped} skipped" if skipped else "")

    stage("data", do_data, inputs={"data_root": str(root)}, config=cfg.data.model_dump(mode="json"))

    # 2. filter: embed with Ray Data, keep samples similar to the targets
    def do_filter(rec):
        from stemqa.filter import run_filter

        records = read_records(run.artifact("data", "train"))
        targets = {t.name: read_records(run.artifact("data", f"target_{t.name}")) for t in cfg.filter.targets}
        res = run_filter(records, targets, cfg.filter, rec.dir)
        for key in ("kept_path", "scores_path", "histogram"):
            rec.add_artifact(key.removesuffix("_path"), res[key])
        rec.add_metrics(kept=res["kept"], total=res["total"], counts=res["counts"])
        return f"kept {res['kept']} of {res['total']}"

    stage("filter", do_filter, inputs={"train": "data/train.jsonl"}, config=cfg.filter.model_dump(mode="json"))

    # 3. SFT on the kept MCQs
    def do_sft(rec, live):
        from stemqa.train.sft import run_sft

        res = run_sft(cfg, run.artifact("filter", "kept"), rec.dir, base_model=cfg.model.name,
                      tracking=live)
        rec.add_artifact("model", res["model_dir"])
        rec.add_metrics(**res["metrics"])
        m = res["metrics"]
        return f"loss {m.get('train_loss_first', float('nan')):.3f} -> {m.get('train_loss_last', float('nan')):.3f}"

    stage("sft", do_sft, inputs={"train": "filter/kept.jsonl", "base_model": cfg.model.name},
          config=cfg.sft.model_dump(mode="json"), live=True)

    # 4. DPO from the SFT model, reference = the SFT model (precomputed log-probs)
    def do_dpo(rec, live):
        from stemqa.data.preference import prepare_pairs
        from stemqa.models import load_tokenizer
        from stemqa.train.dpo import run_dpo

        sft_model = str(run.artifact("sft", "model"))
        pairs = prepare_pairs(cfg.data.preference, root, load_tokenizer(sft_model), cfg.dpo, rec.dir / "pairs")
        rec.add_artifact("pairs", rec.dir / "pairs")
        res = run_dpo(cfg, rec.dir / "pairs", rec.dir, base_model=sft_model, tracking=live)
        rec.add_artifact("model", res["model_dir"])
        rec.add_metrics(pairs=pairs.get("counts", {}), **res["metrics"])
        m = res["metrics"]
        return (f"reward accuracy: val best {m.get('val_reward_accuracy_best', float('nan')):.2f}, "
                f"test {m.get('test_reward_accuracy', float('nan')):.2f}")

    stage("dpo", do_dpo, inputs={"base_model": "sft/model"}, config=cfg.dpo.model_dump(mode="json"), live=True)

    # 5. quantize the DPO model, calibrated on SFT data (a Ray task)
    def do_quant(rec):
        from stemqa.quant import quantize_remote

        kept = read_records(run.artifact("filter", "kept"))
        calib = random.Random(cfg.data.seed).sample(kept, min(cfg.quant.calibration_samples, len(kept)))
        res = quantize_remote(cfg.quant, str(run.artifact("dpo", "model")), calib, rec.dir)
        rec.add_artifact("model", res["model_dir"])
        rec.add_metrics(**{k: v for k, v in res.items() if k != "model_dir"})
        return f"{res['method']} {res.get('bits', '')}-bit, {res.get('size_mb', 0):.0f} MB in {res.get('wall_s', 0):.0f} s"

    stage("quant", do_quant, inputs={"model": "dpo/model", "calibration": "filter/kept.jsonl"},
          config=cfg.quant.model_dump(mode="json"))

    # 6. RAG index (Ray Data embedding + FAISS), built once and reused
    def do_rag(rec):
        from stemqa.rag import build_index

        index_dir = build_index(cfg.rag, root, rec.dir / "index")
        rec.add_artifact("index", index_dir)
        manifest = json.loads((Path(index_dir) / "manifest.json").read_text())
        rec.add_metrics(chunks=manifest.get("counts", {}).get("chunks"))
        return f"{manifest.get('counts', {}).get('chunks')} chunks, {manifest.get('embedder')}"

    stage("rag", do_rag, inputs={"data_root": str(root)}, config=cfg.rag.model_dump(mode="json"))

    # 7. evaluate the chosen models on every eval set (Ray tasks)
    def do_eval(rec):
        import ray

        from stemqa.eval.run import evaluate_sets_remote

        candidates = {"base": cfg.model.name}
        for name in ("sft", "dpo", "quant"):
            if run.stage_status(name) == "done":
                candidates[name] = str(run.artifact(name, "model"))
        retriever = None
        if cfg.eval.use_rag:
            from stemqa.rag import Retriever

            retriever = functools.partial(Retriever.load, str(run.artifact("rag", "index")))
        refs = {name: evaluate_sets_remote(candidates[name], cfg, root, rec.dir / name, retriever_factory=retriever)
                for name in cfg.eval.models}
        results = {name: ray.get(ref) for name, ref in refs.items()}
        for name in results:
            rec.add_artifact(name, rec.dir / name)
        rec.add_metrics(**{f"{m}/{s}": r["accuracy"] for m, sets in results.items() for s, r in sets.items()})
        return "; ".join(f"{m}: " + ", ".join(f"{s} {r['accuracy']:.3f}" for s, r in sets.items())
                         for m, sets in results.items())

    stage("eval", do_eval, inputs={"models": cfg.eval.models}, config=cfg.eval.model_dump(mode="json"))

    # 8. serve the quantized model with RAG, and ask it one question over HTTP
    if cfg.serve.enabled and not args.no_serve:
        def do_serve(rec):
            from jobs.serve import SAMPLE as SAMPLE_QUESTION
            from jobs.serve import ask, deploy

            url = deploy(cfg, str(run.artifact("quant", "model")), str(run.artifact("rag", "index")))
            answer = ask(url, SAMPLE_QUESTION["question"], SAMPLE_QUESTION["choices"],
                         api_key=os.environ.get(cfg.serve.api_key_env))
            (rec.dir / "answer.json").write_text(json.dumps(answer, indent=2))
            rec.add_artifact("answer", rec.dir / "answer.json")
            rec.add_metrics(url=url, answer=answer["answer"])
            return f"{url}/v1/mcqa answered {answer['answer']} to {SAMPLE_QUESTION['question']!r}"

        # serving is never "done earlier": the app is (re)deployed on every run
        if run.stage_status("serve") == "done":
            run._update(lambda m: m["stages"].pop("serve"))
        stage("serve", do_serve, inputs={"model": "quant/model", "index": "rag/index"},
              config=cfg.serve.model_dump(mode="json"))

    end_run(run, cfg.tracking)
    print_summary(run, timings)
    return 0


def print_summary(run, timings) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stemqa pipeline — run {run.id}")
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("result")
    for name, (secs, summary) in timings.items():
        table.add_row(name, f"{secs:.0f} s", summary)
    Console(width=160).print(table)
    from stemqa.report import write_report

    print(f"run directory: {run.path}  (manifest.json lists every artifact)")
    print(f"report: {write_report(run.path)}  (stemqa runs show {run.id} for the lineage)")


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
