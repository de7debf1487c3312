"""A training run's per-step history: what rank 0 writes to `<out_dir>/history.jsonl` as it trains.

One JSON object a line: `{"kind": "step", "step", "loss", "tokens", "seconds", "sample_ids", "peak_mem_mb"}` for
each optimizer step (`sample_ids[rank]` = the ids that rank trained on in that step, micro-batches in order) and
`{"kind": "eval", "step", <metric>: value, ...}` for each validation (step 0 = before training). The stage
result's metrics are scalars; the curves live here (the report, the trackers and the tests read them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

HISTORY_FILE = "history.jsonl"


class StepRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int
    loss: float = Field(description="Mean train loss of the optimizer step (all ranks and micro-batches).")
    tokens: int = Field(description="Real (non-padding) tokens the step's forwards saw, all ranks.")
    seconds: float = Field(description="Wall time of the step on rank 0.")
    sample_ids: list[list[str]] = Field(description="Per rank, the sample ids of the step in micro-batch order.")
    peak_mem_mb: Optional[float] = Field(None, description="Rank 0's peak memory in the step: on a GPU "
                                         "torch.cuda.max_memory_allocated (reset every step); on CPU the process's "
                                         "peak RSS so far (getrusage).")


class EvalRow(BaseModel):
    model_config = ConfigDict(extra="allow")  # the method's metrics: loss (SFT); reward_accuracy, ... (DPO)
    step: int


class TrainHistory(BaseModel):
    steps: list[StepRow] = Field(default_factory=list)
    evals: list[EvalRow] = Field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [s.loss for s in self.steps]

    @property
    def step_seconds(self) -> list[float]:
        return [s.seconds for s in self.steps]

    @property
    def sample_ids(self) -> list[list[list[str]]]:
        """[rank][step] -> ids: every rank's samples, step by step (what a resumed run must reproduce)."""
        ranks = max((len(s.sample_ids) for s in self.steps), default=0)
        return [[s.sample_ids[r] for s in self.steps] for r in range(ranks)]

    def eval_dicts(self) -> list[dict]:
        return [e.model_dump() for e in self.evals]

    def tracker_rows(self) -> list[dict]:
        """{"step", "train/loss"} per step and {"step", "val/<metric>"} per eval, merged by step, in step order."""
        rows: dict[int, dict] = {}
        for s in self.steps:
            rows.setdefault(s.step, {})["train/loss"] = s.loss
        for e in self.evals:
            rows.setdefault(e.step, {}).update({f"val/{k}": float(v) for k, v in e.model_dump().items()
                                                if k != "step" and isinstance(v, (int, float))})
        return [{"step": step, **vals} for step, vals in sorted(rows.items())]

    def lines(self) -> str:
        rows = [{"kind": "step", **s.model_dump()} for s in self.steps]
        rows += [{"kind": "eval", **e.model_dump()} for e in self.evals]
        # in the order they happened: a step, then the validation after it
        return "".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: (r["step"], r["kind"] == "eval")))

    def write(self, path) -> Path:
        """Atomically: a reader never sees half a file."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.lines())
        os.replace(tmp, path)
        return path

    @classmethod
    def of(cls, losses: list[float] = (), evals: list[dict] = ()) -> "TrainHistory":
        """A history from a loss per step (steps 1..n) and {"step", <metric>: value} validations."""
        return cls(steps=[StepRow(step=i, loss=v, tokens=0, seconds=0.0, sample_ids=[])
                          for i, v in enumerate(losses, start=1)], evals=[EvalRow(**e) for e in evals])

    @classmethod
    def parse(cls, text: str) -> "TrainHistory":
        out = cls()
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                kind = row.pop("kind")
                (out.steps.append(StepRow(**row)) if kind == "step" else out.evals.append(EvalRow(**row)))
        return out

    @classmethod
    def read(cls, path) -> "TrainHistory":
        return cls.parse(Path(path).read_text())


def read_history(path: Optional[str]) -> Optional[TrainHistory]:
    return TrainHistory.read(path) if path and Path(path).exists() else None
