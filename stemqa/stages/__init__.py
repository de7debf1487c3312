"""The stages of stemqa, one module each (data, filter, sft, dpo, quant, rag, eval, serve); see `base` for the
contract. `get(name)` imports the stage's module and returns its `STAGE`; `names()` lists them without
importing any. The pipeline runs the stages listed in the config's `stages`."""
from __future__ import annotations

import importlib

from stemqa.config.schema import known_stages


def names() -> list[str]:
    return known_stages()


def get(name: str):
    if name not in known_stages():
        raise KeyError(f"no stage {name!r} (stages: {', '.join(known_stages())})")
    return importlib.import_module(f"stemqa.stages.{name}").STAGE
