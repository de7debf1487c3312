"""Model loading: one loader for every causal LM and embedder stemqa uses."""
from stemqa.models.loader import (
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    load_embedder,
    resolve_embedder,
    resolve_model,
)

__all__ = ["ModelLoadError", "load_causal_lm", "load_embedder", "load_tokenizer", "resolve_embedder", "resolve_model"]
