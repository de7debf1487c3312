"""Which model and index to serve: explicit paths, else a pipeline run directory, else the config."""
from __future__ import annotations

from typing import Optional

from stemqa.config import StemqaConfig
from stemqa.runs import Run

# The run's best model first: the quantized one is what students are meant to meet.
MODEL_STAGES = ("quant", "dpo", "sft")


def resolve_sources(cfg: StemqaConfig, model: Optional[str] = None, index: Optional[str] = None,
                    run_dir: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(model_dir, index_dir or None). A run directory supplies what was not given explicitly."""
    if run_dir:
        run = Run(run_dir)  # FileNotFoundError naming the directory when it is not a run
        if model is None:
            for stage in MODEL_STAGES:
                if run.stage_status(stage) == "done":
                    model = str(run.artifact(stage, "model"))
                    break
        if index is None and cfg.rag.enabled and run.stage_status("rag") == "done":
            index = str(run.artifact("rag", "index"))
    model = model or cfg.serve.model_dir or cfg.model.name
    index = index or cfg.serve.index_dir
    return model, index
