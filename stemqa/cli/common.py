"""What every command shares: config arguments, Ray connection, the run directory, one-line user errors.

A command is `stemqa <command> --config <preset|file> [--set a.b=v ...] [--run RUN_DIR]`; `python -m
jobs.<stage>` (the `ray job submit` entry points) runs the same code.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from stemqa.config import StemqaConfig, load_config
from stemqa.config.load import available_presets
from stemqa.ray_utils import init_ray
from stemqa.runs import Run


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "--preset", dest="config", default="demo",
                   help=f"preset name ({', '.join(available_presets())}) or YAML config file (default: demo)")
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


@contextmanager
def user_errors():
    """User errors (bad config, bad data, missing model, a stage without its inputs) as one clear line on stderr
    and exit status 2, not a traceback."""
    from stemqa.config import ConfigError
    from stemqa.data.mcq import MCQFormatError
    from stemqa.data.preference import PreferenceFormatError
    from stemqa.data.qa import QAFormatError
    from stemqa.filter import FilterError
    from stemqa.models import ModelLoadError
    from stemqa.quant.errors import QuantError
    from stemqa.stages.base import StageInputError

    try:
        yield
    except (ConfigError, MCQFormatError, QAFormatError, PreferenceFormatError, FilterError, QuantError,
            ModelLoadError, StageInputError, FileNotFoundError) as e:
        fail(str(e))


def run_main(main, argv: Optional[list[str]] = None) -> None:
    """Run a command's main and exit with its status (user errors as one line, see `user_errors`)."""
    with user_errors():
        code = main(argv) or 0
    sys.exit(code)
