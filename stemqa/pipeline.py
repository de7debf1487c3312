"""The pipeline: the configured stages (`stages` in the config), in order, into one run directory.

    data -> filter (Ray Data) -> sft (Ray Train + DeepSpeed) -> dpo (Ray Train + DeepSpeed) -> quant (Ray task)
    -> rag index (Ray Data + FAISS) -> eval (Ray tasks) -> serve (Ray Serve) and one question over HTTP

Each stage reads what earlier stages recorded in the run's manifest (`Stage.inputs_from_run`) and records itself
there (`stemqa.stages.base.record_stage`). A stage whose config section says `enabled: false` is skipped (the
stages after it read what is there instead: no filter -> SFT trains on data's records; no SFT -> DPO starts
from model.name). On a resumed run (`--run`) a finished stage is not run again, except serve, which deploys
on every run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from stemqa.config.schema import StemqaConfig
from stemqa.progress import Progress
from stemqa.runs import Run
from stemqa.stages import get
from stemqa.stages.base import StageContext, record_stage


@dataclass
class Row:
    stage: str
    seconds: Optional[float]  # None: not run
    summary: str


def run_pipeline(cfg: StemqaConfig, run: Run, data_root: Path, progress: Optional[Progress] = None) -> list[Row]:
    """Run every enabled stage of cfg.stages not already done in `run`; one row per stage for the summary."""
    from stemqa.tracking import end_run

    progress = progress or Progress(enabled=False)
    rows = []
    for name in cfg.stages:
        stage = get(name)
        if not stage.enabled(cfg):
            rows.append(Row(name, None, f"skipped ({name}.enabled is false)"))
            print(f"[{name}] skipped: {name}.enabled is false", flush=True)
            continue
        if run.stage_status(name) == "done" and not stage.rerun_on_resume:
            rows.append(Row(name, 0.0, "done earlier (resumed)"))
            continue
        print(f"[{name}] ...", flush=True)
        t0 = time.time()
        ctx = StageContext(cfg, run.stage_dir(name), data_root, run=run, progress=progress)
        try:
            result = record_stage(stage, ctx, stage.inputs_from_run(ctx))
        except BaseException:
            end_run(run, cfg.tracking, "FAILED")
            raise
        rows.append(Row(name, time.time() - t0, result.summary))
        print(f"[{name}] {result.summary} ({rows[-1].seconds:.0f} s)", flush=True)
    end_run(run, cfg.tracking)
    return rows


def print_summary(run: Run, rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    from stemqa.report import write_report

    table = Table(title=f"stemqa pipeline — run {run.id}")
    table.add_column("stage")
    table.add_column("time", justify="right")
    table.add_column("result")
    for row in rows:
        table.add_row(row.stage, "-" if row.seconds is None else f"{row.seconds:.0f} s", row.summary)
    Console(width=160).print(table)
    print(f"run directory: {run.path}  (manifest.json lists every artifact)")
    print(f"report: {write_report(run.path)}  (stemqa runs show {run.id} for the lineage)")
