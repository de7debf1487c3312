"""`stemqa quant report`: quantize with each method and measure accuracy / size / memory / speed (the work is
stemqa.quant.report.report; this is its argument parsing)."""
from __future__ import annotations

import sys


def main(argv=None) -> int:
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
