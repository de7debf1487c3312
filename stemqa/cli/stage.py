"""`stemqa <stage>` / `python -m jobs.<stage>`: run one stage from the command line.

    stemqa <stage> [--config PRESET|FILE] [--set a.b=v ...] [--out DIR | --run RUN_DIR] [the stage's options]

With --out the stage works in DIR and nothing else is recorded; otherwise it runs inside a run directory (a new
one under cluster.storage_path, or --run), recorded in its manifest like a pipeline stage, reading what it
needs from the run's earlier stages when the options do not say. Progress goes to stderr while it runs; the
result (JSON, or the stage's own table) to stdout.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Optional

from stemqa.cli.common import config_from, connect, open_run, parser
from stemqa.progress import Progress
from stemqa.stages import get
from stemqa.stages.base import StageContext, record_stage


def stage_main(name: str, argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    from stemqa.data.paths import data_root

    stage = get(name)
    p = parser(prog or f"stemqa {name}", stage.__doc__ or stage.description)
    p.add_argument("--out", default=None, help="output directory (default: the stage's directory in a run)")
    stage.add_arguments(p)
    args = p.parse_intermixed_args(argv)  # a stage's positional arguments may follow its options
    cfg = config_from(args)
    done = stage.command(args, cfg)
    if done is not None:
        return done
    root = data_root(cfg.data.root)
    if stage.uses_ray:
        connect(cfg)
    with Progress() as progress, tempfile.TemporaryDirectory(prefix="stemqa-") as scratch:
        if args.out or (not stage.uses_ray and not args.run):
            ctx = StageContext(cfg, Path(args.out or scratch).resolve(), root, progress=progress)
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            result = stage.run(ctx, stage.inputs_from_args(args, ctx))
            if not args.out:  # `stemqa data FILE --format F`: a check of the files; nothing is kept
                result.artifacts = {}
        else:
            run = open_run(args, cfg)
            print(f"run {run.id} at {run.path}", file=sys.stderr)
            ctx = StageContext(cfg, run.stage_dir(name), root, run=run, progress=progress)
            try:
                result = record_stage(stage, ctx, stage.inputs_from_args(args, ctx))
            finally:
                from stemqa.tracking import end_run

                end_run(run, cfg.tracking, "FINISHED" if sys.exc_info()[0] is None else "FAILED")
        progress.close()
        stage.show(result)
    return 0
