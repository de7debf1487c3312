"""`stemqa report <run>`: write one self-contained HTML report of a run (images inline, no CDN).

`<run>` is a run directory or a run id under cluster.storage_path; `--compare <run> ...` overlays other runs'
training curves (e.g. grad_accum 1 vs 4). Prints the report's path.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stemqa.config import load_config
from stemqa.report import write_report


def resolve_run(ref: str, storage: Path) -> Path:
    path = Path(ref)
    if (path / "manifest.json").exists():
        return path
    if (storage / ref / "manifest.json").exists():
        return storage / ref
    raise FileNotFoundError(f"{ref}: no run directory with a manifest.json (looked in . and {storage.resolve()})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stemqa report", description=__doc__)
    p.add_argument("run", help="run directory or run id")
    p.add_argument("--compare", nargs="*", default=[], help="other runs whose curves are overlaid")
    p.add_argument("--out", default=None, help="HTML path (default: <run>/report.html)")
    p.add_argument("--config", "--preset", dest="config", default="demo", help="preset or YAML (for storage_path)")
    p.add_argument("--storage", default=None, help="runs directory (default: the config's cluster.storage_path)")
    args = p.parse_args(argv)
    storage = Path(args.storage or load_config(args.config, []).cluster.storage_path)
    out = write_report(resolve_run(args.run, storage), args.out, [resolve_run(c, storage) for c in args.compare])
    print(f"report: {out.resolve()}")
    return 0

