"""Which model and index to serve: explicit paths, else a pipeline run directory, else the config."""
from __future__ import annotations

from typing import Optional

from stemqa.config import StemqaConfig
from stemqa.runs import Run


def resolve_sources(cfg: StemqaConfig, model: Optional[str] = None, index: Optional[str] = None,
                    run_dir: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(model_dir, index_dir or None). A run directory supplies what was not given explicitly (its quantized,
    else DPO, else SFT model; its RAG index): the serve stage's own rule, `stemqa.stages.serve.serving_sources`."""
    from stemqa.stages.serve import serving_sources

    # Run(): FileNotFoundError naming the directory when it is not a run
    return serving_sources(cfg, model, index, Run(run_dir) if run_dir else None)
