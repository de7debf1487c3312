"""Quantization trade-off benchmark (issue 5): `stemqa quant report`, then its table into BENCHMARKS.md.

The measuring is stemqa.quant.report (one fresh process per row); this script only runs it with the
benchmark's settings and replaces the "## Quantization trade-off" section of benchmarks/BENCHMARKS.md.

    python benchmarks/bench_quant.py          # SmolLM2-135M, every setting (the command in BENCHMARKS.md)
    python benchmarks/bench_quant.py --resume # keep the rows an interrupted run finished, measure the rest
    python benchmarks/bench_quant.py --from-existing    # only re-write BENCHMARKS.md from benchmarks/out/quant
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out" / "quant"
SECTION = "## Quantization trade-off"
REPORT_ARGS = ["report", "--model", "smollm2-135m-instruct", "--out", str(OUT.relative_to(ROOT)),
               "--settings", "int8-weight,bnb-4bit,bnb-8bit,smoothquant-w8a8,qat-w4,qat-w2,gptq-w8,gptq-w2,smoothquant-w4a8,gptq-w4",
               "--n-mmlu", "50", "--n-arc", "50", "--group-size", "64", "--calib-samples", "200",
               "--calib-study", "20,2000", "--qat-steps", "20", "--gen-tokens", "32", "--gen-batch", "8"]


def write_section(body: str) -> None:
    from mdsection import replace_section

    replace_section(SECTION, f"{SECTION}\n\n{body.strip()}\n")


def from_partial(note: str, header: str) -> None:
    import json

    from stemqa.quant.report import PARTIAL, settings, write_outputs

    done = [json.loads(line) for line in (OUT / PARTIAL).read_text().splitlines() if line.strip()]
    opts = dict(zip(REPORT_ARGS[1::2], REPORT_ARGS[2::2]))
    planned = settings(opts["--settings"].split(","), int(opts["--group-size"]), int(opts["--calib-samples"]),
                       [int(c) for c in opts.get("--calib-study", "").split(",") if c])
    seen = {r["setting"] for r in done}
    rows = done + [{"setting": r.label, "method": r.qcfg.method if r.qcfg else "none", "note": note}
                   for r in planned if r.label not in seen]
    write_outputs(rows, OUT, header, "Quantization trade-off, smollm2-135m-instruct")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-existing", action="store_true", help="do not measure; use benchmarks/out/quant")
    p.add_argument("--from-partial", default=None, metavar="NOTE",
                   help="do not measure; build the outputs from the rows an interrupted report finished, the "
                   "planned rows it did not reach get NOTE")
    p.add_argument("--header", default="", help="text above the table (with --from-partial)")
    p.add_argument("--resume", action="store_true", help="keep the rows an interrupted run finished")
    args = p.parse_args(argv)
    if args.from_partial:
        from_partial(args.from_partial, args.header)
    elif not args.from_existing:
        from stemqa.cli.quant import main as quant_main

        if quant_main(REPORT_ARGS + ["--resume"] * args.resume) != 0:
            return 1
    md = (OUT / "quant_report.md").read_text()
    write_section(md + f"\nFigure: `benchmarks/out/quant/quant_tradeoff.png`; CSV: `benchmarks/out/quant/quant_report.csv`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
