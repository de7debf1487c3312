"""`stemqa quantize`: quantize a model (GPTQ, SmoothQuant+GPTQ, int8 weight-only, bitsandbytes) as a Ray task.

    stemqa quantize --config demo --model DIR --calib X.jsonl --out DIR [--set quant.method=bnb-4bit]

Without --out the model goes to a run directory (<run>/quant/model) recorded in its manifest.
"""
from __future__ import annotations

from pathlib import Path

from jobs.common import config_from, connect, fail, open_run, parser, print_json
from stemqa.data.mcq import PARSERS, load_file, load_sources
from stemqa.data.paths import data_root


def main(argv=None) -> int:
    p = parser("stemqa quantize", __doc__)
    p.add_argument("--model", default=None, help="model to quantize (default: model.name of the config)")
    p.add_argument("--calib", default=None, help="MCQ file for calibration (default: the config's data.train)")
    p.add_argument("--calib-format", default="records_jsonl", choices=sorted(PARSERS),
                   help="layout of --calib (default: records_jsonl, as written by `stemqa data`/filter)")
    p.add_argument("--out", default=None, help="output model directory (default: <run>/quant/model)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    model = args.model or cfg.model.name
    if args.calib:
        records, _ = load_file(args.calib, args.calib_format, skip_invalid=cfg.data.skip_invalid)
    else:
        records, _ = load_sources(cfg.data.train, data_root(cfg.data.root), cfg.data.skip_invalid)

    from stemqa.quant import QuantError, quantize_remote

    connect(cfg)
    try:
        if args.out:
            result = quantize_remote(cfg.quant, model, records, Path(args.out))
        else:
            run = open_run(args, cfg)
            with run.stage("quant", inputs={"model": model}, config=cfg.quant.model_dump(mode="json")) as rec:
                result = quantize_remote(cfg.quant, model, records, rec.dir / "model")
                rec.add_artifact("model", result["model_dir"])
                rec.add_metrics(**{k: v for k, v in result.items() if k != "model_dir"})
    except QuantError as e:
        fail(str(e))
    print_json(result)
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
