"""Similarity filtering: keep training samples close to the target sets (seed appendix A.3)."""
from stemqa.filter.similarity import (
    FilterError,
    keep_mask,
    load_targets,
    max_similarity,
    mcq_text,
    run_filter,
)

__all__ = ["FilterError", "keep_mask", "load_targets", "max_similarity", "mcq_text", "run_filter"]
