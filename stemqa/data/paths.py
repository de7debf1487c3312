"""Where the data is: ../shared/data when present, else the small sample packaged with stemqa."""
from __future__ import annotations

import os
from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"


def data_root(configured: str = "auto") -> Path:
    """Resolve `data.root`: an explicit path, or 'auto' = $STEMQA_DATA_ROOT, ../shared/data, the sample."""
    if configured != "auto":
        path = Path(configured).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(f"data.root: {path} is not a directory")
        return path
    candidates = [os.environ.get("STEMQA_DATA_ROOT"), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[3] / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "mcq").is_dir():
            return Path(c).resolve()
    return SAMPLE_DATA


def resolve(root: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root) / p
