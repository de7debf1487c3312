"""`stemqa`: one subcommand per stage; each is the same code as `python -m jobs.<stage>` (ray job submit)."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv), one-line help). Order is the pipeline's.
COMMANDS = {
    "pipeline": ("jobs.pipeline", "run every stage on Ray, then serve and answer a question (the main job)"),
    "data": ("jobs.data", "load and validate MCQ sources; write them as records"),
    "filter": ("jobs.filter", "embed samples with Ray Data and keep those similar to target sets"),
    "sft": ("jobs.sft", "supervised fine-tuning (full or LoRA) on Ray Train + DeepSpeed"),
    "dpo": ("jobs.dpo", "DPO (sigmoid/robust/ipo) on Ray Train + DeepSpeed, reference log-probs precomputed"),
    "quantize": ("jobs.quantize", "quantize a model (GPTQ, SmoothQuant+GPTQ, bitsandbytes, int8, QAT)"),
    "quant": ("stemqa.cli:quant_main", "quantization tools: `quant report` = accuracy / memory / speed table + figure"),
    "rag": ("jobs.rag", "build the RAG corpus and FAISS index with Ray Data; query it"),
    "eval": ("jobs.eval", "MCQA accuracy by answer-letter log-likelihood (lm-eval compatible)"),
    "serve": ("jobs.serve", "start the Ray Serve app (RAG + model) and answer over HTTP"),
    "config": ("jobs.config", "show a preset or config file, or the documented schema"),
    "sweep": ("jobs.sweep:main", "Ray Tune sweep over a search space (tune_spaces/*.yaml) with ASHA"),
    "runs": ("jobs.runs:main", "list runs, or show one run's stages, configs, artifacts and lineage"),
    "report": ("jobs.report:main", "write a self-contained HTML report of a run"),
    "submit": ("jobs.submit:main", "submit a stage or the pipeline to a Ray cluster (ray job submit), follow its logs"),
    "jobs": ("jobs.submit:list_main", "list the Ray jobs on a cluster and their status"),
    "stop": ("jobs.submit:stop_main", "stop a Ray job by id"),
}


def quant_main(argv=None) -> int:
    """`stemqa quant report ...`: argument parsing only; the work is stemqa.quant.report.report."""
    import argparse

    p = argparse.ArgumentParser(prog="stemqa quant", description="quantization tools")
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("report", help="quantize with each method, measure accuracy / size / memory / speed, "
                       "write CSV, markdown and a trade-off PNG")
    r.add_argument("--model", default="smollm2-135m-instruct")
    r.add_argument("--out", default="benchmarks/out/quant", help="output directory")
    r.add_argument("--settings", default=None, help="comma-separated settings (default: %(default)s = the "
                   "standard set); known: gptq-w4, gptq-w8, smoothquant-w8a8, smoothquant-w4a8, int8-weight, "
                   "bnb-8bit, bnb-4bit, qat-w4, qat-w2")
    r.add_argument("--n-mmlu", type=int, default=100, help="MMLU STEM questions")
    r.add_argument("--n-arc", type=int, default=100, help="ARC-Easy test questions")
    r.add_argument("--group-size", type=int, default=64)
    r.add_argument("--calib-samples", type=int, default=200, help="calibration / QAT samples of calibrated rows")
    r.add_argument("--calib-study", default="", help="extra gptq-w4 rows with these |C|, e.g. 20,200,2000")
    r.add_argument("--qat-steps", type=int, default=None, help="QAT training steps (default: quant.qat_steps)")
    r.add_argument("--threads", type=int, default=2, help="torch threads of each measuring process")
    r.add_argument("--gen-tokens", type=int, default=32)
    r.add_argument("--gen-batch", type=int, default=8, help="the larger generation batch")
    r.add_argument("--keep-models", action="store_true", help="keep the quantized model directories")
    r.add_argument("--resume", action="store_true", help="keep the rows an interrupted report in --out finished "
                   "(same measuring settings) and measure only the rest")
    args = p.parse_args(argv)

    from stemqa.quant.report import DEFAULT_SETTINGS, report

    names = args.settings.split(",") if args.settings else DEFAULT_SETTINGS
    study = [int(c) for c in args.calib_study.split(",") if c]
    command = "stemqa quant " + " ".join(argv if argv is not None else sys.argv[2:])
    try:
        res = report(args.model, args.out, names, args.n_mmlu, args.n_arc, calib_samples=args.calib_samples,
                     calib_study=study, group_size=args.group_size, qat_steps=args.qat_steps, threads=args.threads,
                     gen_tokens=args.gen_tokens, gen_batch=args.gen_batch, keep_models=args.keep_models,
                     command=command, resume=args.resume)
    except ValueError as e:
        print(f"stemqa quant: {e}", file=sys.stderr)
        return 2
    print(open(res["paths"]["md"]).read())
    print("\n".join(f"{k}: {v}" for k, v in res["paths"].items()))
    return 0


def usage() -> str:
    lines = ["usage: stemqa <command> [options]   (stemqa <command> --help for each)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Every command takes --config <preset|file.yaml> and --set path=value overrides.",
              "Presets: demo (offline, this machine, minutes), qwen3-0.6b (GPU cluster settings)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"stemqa: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module_name, _, func = COMMANDS[cmd][0].partition(":")
    module = importlib.import_module(module_name)
    from jobs.common import run_main

    run_main(getattr(module, func or "main"), rest)


if __name__ == "__main__":
    main()
