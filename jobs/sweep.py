"""`stemqa sweep` / `python -m jobs.sweep`: a Ray Tune sweep over SFT, DPO or quantization settings, with ASHA.

    stemqa sweep <space.yaml | sft | dpo | quant> [--config PRESET|FILE] [--set a.b=v ...] [--out DIR]
                 [--train records.jsonl] [--pairs DIR] [--model M] [--calib records.jsonl] [--address ADDR]

The space (tune_spaces/*.yaml) says what to sweep; --config replaces its `base` config and --set overrides it.
Every trial's config is checked before Ray starts. Writes DIR/results.csv, DIR/best.yaml (accepted as is by
`stemqa sft|dpo|quantize --config`), DIR/plots/*.png, and prints the results table. Running again with the
same --out resumes an interrupted sweep (Tuner.restore): finished trials are not run again.
Default --out: <cluster.storage_path>/sweep-<stage>-<time>.
"""
from __future__ import annotations

import time
from pathlib import Path

from jobs.common import connect, parser, print_json


def main(argv=None) -> int:
    p = parser("stemqa sweep", __doc__)
    p.set_defaults(config=None)  # default: the space's own `base`
    p.add_argument("space", help="search space YAML, or a built-in name: sft, dpo, quant (tune_spaces/)")
    p.add_argument("--out", default=None, help="sweep directory; an existing one is resumed")
    p.add_argument("--train", default=None, help="sft: MCQ records JSONL to train on (default: data.train)")
    p.add_argument("--pairs", default=None, help="dpo: directory of train/val/test.jsonl pairs (default: made "
                   "from data.preference)")
    p.add_argument("--model", default=None, help="dpo/quant: model to start from (default: model.name)")
    p.add_argument("--calib", default=None, help="quant: MCQ records JSONL for calibration (default: data.train)")
    args = p.parse_args(argv)

    from stemqa.tune.space import load_space

    space = load_space(args.space, base=args.config, overrides=args.overrides)  # ConfigError: one clear line
    cfg = space.base.model_copy(deep=True)  # where to run; the trials' own config stays as loaded
    if args.address:
        cfg.cluster.address = args.address
    if args.verbose:
        cfg.cluster.quiet = False
    out = Path(args.out or args.run or Path(cfg.cluster.storage_path) / f"sweep-{space.sweep.stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    connect(cfg)
    from stemqa.tune.sweep import run_sweep

    summary = run_sweep(space, out, train=args.train, pairs=args.pairs, model=args.model, calib=args.calib,
                        verbose=2 if args.verbose else 1)
    summary.pop("table", None)  # already printed
    print_json(summary)
    return 0 if summary["counts"]["completed"] else 1


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
