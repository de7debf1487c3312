"""`stemqa pipeline` / `python -m jobs.pipeline`: every stage of stemqa as real Ray work, in order, into one run
directory, then one question to the served model.

Run it as `stemqa pipeline --preset demo` (connects to the local cluster from cluster/local.sh when it runs,
else starts a private Ray) or `ray job submit --working-dir . -- python -m jobs.pipeline --preset demo`.
Every stage records its inputs, config, artifacts and metrics in <run>/manifest.json. `--run <dir>` resumes a
run: stages already done are not run again.
"""
from __future__ import annotations

from typing import Optional

from stemqa.cli.common import config_from, connect, open_run, parser


def main(argv: Optional[list[str]] = None) -> int:
    from stemqa.data.paths import data_root
    from stemqa.pipeline import print_summary, run_pipeline
    from stemqa.progress import Progress

    p = parser("stemqa pipeline", __doc__)
    p.add_argument("--no-serve", action="store_true", help="stop after evaluation (no Serve app; = --set "
                   "serve.enabled=false)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    if args.no_serve:
        cfg.serve.enabled = False
    root = data_root(cfg.data.root)
    address = connect(cfg)
    run = open_run(args, cfg)
    print(f"run {run.id} at {run.path}\nray {address}; data from {root}", flush=True)
    with Progress() as progress:
        rows = run_pipeline(cfg, run, root, progress)
    print_summary(run, rows)
    return 0
