"""The run store: one directory per run, with a manifest linking every artifact to its inputs and config.

    <storage>/<run_id>/manifest.json
    <storage>/<run_id>/<stage>/...            artifacts of each stage

`manifest.json` holds the run's config and, per stage, its status, times, inputs (artifacts of earlier
stages it consumed), its own artifacts (paths relative to the run dir), metrics and error. It is rewritten
atomically after every change, so a crash never loses what an earlier stage recorded.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class Run:
    def __init__(self, path):
        self.path = Path(path).resolve()  # artifacts are recorded relative to it
        self.manifest_path = self.path / "manifest.json"
        if not self.manifest_path.exists():
            raise FileNotFoundError(f"{self.path}: not a run directory (no manifest.json)")

    @classmethod
    def create(cls, storage: str, name: str, config: Optional[dict] = None, run_id: Optional[str] = None) -> "Run":
        run_id = run_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        path = Path(storage).expanduser().resolve() / run_id
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "manifest.json").exists():
            _atomic_write_json(path / "manifest.json", {
                "run_id": run_id, "name": name, "created": time.time(), "config": config or {}, "stages": {},
            })
        return cls(path)

    @property
    def id(self) -> str:
        return self.path.name

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def _update(self, fn) -> dict:
        m = self.manifest()
        fn(m)
        _atomic_write_json(self.manifest_path, m)
        return m

    def stage_dir(self, stage: str) -> Path:
        d = self.path / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def artifact(self, stage: str, name: str) -> Path:
        """Absolute path of an artifact a finished stage recorded."""
        st = self.manifest()["stages"].get(stage)
        if not st or st.get("status") != "done" or name not in st.get("artifacts", {}):
            raise KeyError(f"run {self.id}: stage '{stage}' has no finished artifact '{name}'")
        return self.path / st["artifacts"][name]

    def stage_status(self, stage: str) -> Optional[str]:
        return self.manifest()["stages"].get(stage, {}).get("status")

    @contextmanager
    def stage(self, name: str, inputs: Optional[dict] = None, config: Optional[dict] = None):
        """Record a stage: yields a `StageRecord` to add artifacts and metrics to; errors are recorded."""
        rec = StageRecord(self, name)
        self._update(lambda m: m["stages"].__setitem__(name, {
            "status": "running", "started": time.time(), "inputs": inputs or {}, "config": config or {},
            "artifacts": {}, "metrics": {},
        }))
        try:
            yield rec
        except BaseException as e:
            def fail(m):
                s = m["stages"][name]
                s.update(status="failed", ended=time.time(), error=f"{type(e).__name__}: {e}",
                         traceback=traceback.format_exc()[-4000:])
            self._update(fail)
            raise
        self._update(lambda m: m["stages"][name].update(status="done", ended=time.time()))


class StageRecord:
    def __init__(self, run: Run, name: str):
        self.run, self.name = run, name
        self.dir = run.stage_dir(name)

    def add_artifact(self, key: str, path) -> Path:
        path = Path(path).resolve()
        rel = os.path.relpath(path, self.run.path)
        self.run._update(lambda m: m["stages"][self.name]["artifacts"].__setitem__(key, rel))
        return path

    def add_metrics(self, **metrics) -> None:
        self.run._update(lambda m: m["stages"][self.name]["metrics"].update(metrics))
