"""What every job entry point shares: config arguments, Ray connection, the run directory.

A job is `python -m jobs.<stage> --config <preset|file> [--set a.b=v ...] [--run RUN_DIR]`; the same `main`
is `stemqa <stage>`. Jobs stay thin: parse, load config, connect to Ray, call the stage, print the result.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from stemqa.ray_utils import init_ray  # first: it loads the local cluster's client env before ray is imported
from stemqa.config import StemqaConfig, load_config
from stemqa.runs import Run


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "--preset", dest="config", default="demo",
                   help="preset name (demo, qwen3-0.6b) or YAML config file (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a config field, e.g. --set sft.lr=1e-4 (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: the local cluster if running, else local Ray)")
    p.add_argument("--run", default=None, help="run directory to use or resume (default: a new one under cluster.storage_path)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    return p


def config_from(args) -> StemqaConfig:
    cfg = load_config(args.config, args.overrides)  # ConfigError -> one clear line via run_main
    if args.address:
        cfg.cluster.address = args.address
    if args.verbose:
        cfg.cluster.quiet = False
    return cfg


def open_run(args, cfg: StemqaConfig) -> Run:
    if args.run:
        path = Path(args.run)
        if (path / "manifest.json").exists():
            return Run(path)
        return Run.create(str(path.parent), cfg.name, cfg.model_dump(mode="json"), run_id=path.name)
    return Run.create(cfg.cluster.storage_path, cfg.name, cfg.model_dump(mode="json"))


def connect(cfg: StemqaConfig) -> str:
    return init_ray(cfg.cluster.address, quiet=cfg.cluster.quiet)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def run_main(main, argv: Optional[list[str]] = None) -> None:
    """Run a job's main with user errors (bad config, bad data, missing model) as one clear line."""
    from stemqa.config import ConfigError
    from stemqa.data.mcq import MCQFormatError
    from stemqa.models import ModelLoadError

    try:
        sys.exit(main(argv) or 0)
    except (ConfigError, MCQFormatError, ModelLoadError, FileNotFoundError) as e:
        fail(str(e))
