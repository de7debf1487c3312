"""`stemqa sweep` / `python -m jobs.sweep`: a Ray Tune sweep over a stage's settings (SFT, DPO or quantization),
each trial the stage's own run, with ASHA.

    stemqa sweep <space.yaml | sft | dpo | quant | tiny> [--config PRESET|FILE] [--set a.b=v ...] [--out DIR]
                 [the stage's own options: sft --data F; dpo --pairs DIR --model M; quant --model M --calib F]

The space (stemqa/tune/spaces/*.yaml, or a file) says what to sweep; --config replaces its `base` config and
--set overrides it. Every trial's config is checked before Ray starts. Writes DIR/results.csv, DIR/best.yaml
(accepted as is by `stemqa sft|dpo|quantize --config`), DIR/plots/*.png, and prints the results table; a line
per trial while it runs. Running again with the same --out resumes an interrupted sweep (Tuner.restore):
finished trials are not run again. Default --out: <cluster.storage_path>/sweep-<stage>-<time>.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from stemqa.cli.common import connect, parser, print_json


def main(argv: Optional[list[str]] = None) -> int:
    from stemqa.tune.space import load_space, sweepable_stage
    from stemqa.tune.sweep import run_sweep

    p = parser("stemqa sweep", __doc__)
    p.set_defaults(config=None)  # default: the space's own `base`
    p.add_argument("space", help="search space YAML, or one shipped with stemqa: sft, dpo, quant, tiny")
    p.add_argument("--out", default=None, help="sweep directory; an existing one is resumed")
    first, _ = p.parse_known_args(argv)
    space = load_space(first.space, base=first.config, overrides=first.overrides)  # ConfigError: one clear line
    sweepable_stage(space.sweep.stage).add_arguments(p)  # the stage's own options: its inputs
    args = p.parse_args(argv)
    cfg = space.base.model_copy(deep=True)  # where to run; the trials' own config stays as loaded
    if args.address:
        cfg.cluster.address = args.address
    if args.verbose:
        cfg.cluster.quiet = False
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or args.run or Path(cfg.cluster.storage_path) / f"sweep-{space.sweep.stage}-{stamp}")
    connect(cfg)
    summary = run_sweep(space, out, args, verbose=2 if args.verbose else 1)
    summary.pop("table", None)  # already printed
    print_json(summary)
    return 0 if summary["counts"]["completed"] else 1
