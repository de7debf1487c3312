"""Histogram of the filter scores with the cut-off marked (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def score_histogram(scores: dict[str, np.ndarray], cutoff: Optional[float], cutoff_label: str, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(min(float(v.min()) for v in scores.values()), max(float(v.max()) for v in scores.values()), 41)
    for name, values in scores.items():
        ax.hist(values, bins=bins, alpha=0.5 if name != "mean" else 0.8, label=name,
                histtype="stepfilled" if name == "mean" else "step", linewidth=1.5)
    if cutoff is not None:
        ax.axvline(cutoff, color="red", linestyle="--", label=cutoff_label)
    ax.set_xlabel("max cosine similarity to the target set")
    ax.set_ylabel("samples")
    ax.set_title("Similarity filter scores")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
