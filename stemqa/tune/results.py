"""What a finished sweep leaves: results.csv + a printed table, best.yaml (a config the stage jobs accept as is),
and PNG plots of the target metric against each swept parameter (and the metric over steps per trial).

A trial's status: `completed` (its stage run finished), `stopped` (ASHA, or the time budget, stopped it early),
`failed` (it raised; the first line of its error is kept).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from stemqa.config import to_yaml
from stemqa.tune.space import TRIAL_PREFIX, Space, apply_values, flat_params, split_trial, sweepable_stage

TIMING = ["trial_wall_s", "fit_s", "worker_setup_s", "train_s"]


def _cell(value: Any) -> Any:
    """Lists and mappings (sft.lora: {...}) as compact JSON so a CSV cell holds them."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return value


def _status(result) -> str:
    m = result.metrics or {}
    if result.error is not None:
        return "failed"
    return "completed" if (m.get("trial_done") or "steps" in m) else "stopped"


def _error_line(error) -> Optional[str]:
    if error is None:
        return None
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    # Ray wraps the cause in a traceback; its last line is the exception that ended the trial
    return (lines[-1] if lines else type(error).__name__)[:300]


def _progress(result):
    try:
        return result.metrics_dataframe
    except Exception:  # a trial that never reported has no progress file
        return None


def collect(grid, space: Space) -> list[dict]:
    """One row per trial: id, status, every swept value, target metric, steps reached, timings, error."""
    sw = space.sweep
    rows = []
    for result in grid:
        m = result.metrics or {}
        df = _progress(result)
        values = flat_params(result.config or {})
        steps = None
        if df is not None and "step" in df:
            steps = df["step"].max()
            steps = None if steps != steps else int(steps)  # NaN when no report carried a step
        row = {"trial_id": m.get("trial_id") or Path(result.path).name, "status": _status(result)}
        row.update({p: _cell(values.get(p)) for p in space.swept_paths()})
        row[sw.metric] = m.get(sw.metric)
        row["steps"] = steps
        row["reports"] = m.get("training_iteration")
        row.update({k: m.get(k) for k in sweepable_stage(sw.stage).sweep_columns + TIMING})
        row["error"] = _error_line(result.error)
        row["_values"] = values
        row["_progress"] = df
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def best_row(rows: list[dict], metric: str, mode: str) -> Optional[dict]:
    done = [r for r in rows if r["status"] == "completed" and isinstance(r.get(metric), (int, float))
            and not math.isnan(r[metric])]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r[metric])


def best_config_yaml(space: Space, values: dict) -> str:
    """The winning trial's full config (base + fixed + its values) as YAML, validated like any config file."""
    cfg_values, _ = split_trial(values)
    return to_yaml(apply_values(space.base, cfg_values, f"{space.path} (best trial)"))


def format_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, float):
            return f"{v:.4g}"
        s = str(v)
        return s if len(s) <= 40 else s[:37] + "..."

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda items: "  ".join(s.ljust(w) for s, w in zip(items, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_results(grid, space: Space, out_dir: Path, echo: bool = True) -> dict:
    """results.csv, the printed table, best.yaml and plots/ under out_dir; returns what was written."""
    import csv

    out_dir = Path(out_dir)
    sw = space.sweep
    rows = collect(grid, space)
    columns = [c for c in rows[0] if not c.startswith("_")] if rows else ["trial_id", "status"]
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    shown = ["trial_id", "status", *space.swept_paths(), sw.metric, "steps", "trial_wall_s", "error"]
    table = format_table(rows, shown)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "failed")}
    best = best_row(rows, sw.metric, sw.mode)
    best_yaml = None
    if best is not None:
        best_yaml = out_dir / "best.yaml"
        best_yaml.write_text(f"# best trial {best['trial_id']} of {space.path}: {sw.metric} = {best[sw.metric]}\n"
                             + best_config_yaml(space, best["_values"]))
    plots = plot_results(rows, space, out_dir / "plots")
    if echo:
        print(table)
        print(f"\n{counts['completed']} completed, {counts['stopped']} stopped early, {counts['failed']} failed; "
              + (f"best {best['trial_id']}: {sw.metric} = {best[sw.metric]:.4g} -> {best_yaml}" if best
                 else "no completed trial, no best config"))
    return {"results_csv": str(out_dir / "results.csv"), "best_yaml": str(best_yaml) if best_yaml else None,
            "best": {k: v for k, v in best.items() if not k.startswith("_")} if best else None,
            "plots": [str(p) for p in plots], "counts": counts, "table": table}


# ---------------------------------------------------------------- plots
STYLE = {"completed": ("tab:blue", "o"), "stopped": ("tab:orange", "s"), "failed": ("tab:red", "x")}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def plot_results(rows: list[dict], space: Space, plot_dir: Path) -> list[Path]:
    """metric vs each swept parameter (log x for log-uniform ranges, categories otherwise), and the metric
    reported over steps by each trial (DPO: validation reward accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    sw, out = space.sweep, []
    for path in [p for p in space.swept_paths() if not p.startswith(TRIAL_PREFIX)]:  # not fault injection
        spec = sw.params.get(path)
        numeric = all(isinstance(r["_values"].get(path), (int, float)) and not isinstance(r["_values"].get(path), bool)
                      for r in rows)
        cats = sorted({json.dumps(r["_values"].get(path), sort_keys=True) for r in rows}) if not numeric else []
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for status, (color, marker) in STYLE.items():
            of_status = [r for r in rows if r["status"] == status]
            pts = [r for r in of_status if isinstance(r.get(sw.metric), (int, float))]
            xs = [r["_values"].get(path) if numeric else cats.index(json.dumps(r["_values"].get(path), sort_keys=True))
                  for r in pts]
            note = "" if len(pts) == len(of_status) else f", {len(of_status) - len(pts)} without {sw.metric}"
            ax.scatter(xs, [r[sw.metric] for r in pts], c=color, marker=marker,
                       label=f"{status} ({len(of_status)}{note})")
        values = [r["_values"].get(path) for r in rows]
        if numeric and ((spec is not None and spec.kind == "loguniform")
                        or (min(values) > 0 and max(values) / min(values) >= 100)):  # values decades apart
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(cats)), [c if len(c) < 24 else c[:21] + "..." for c in cats], fontsize=7,
                          rotation=15)
        ax.set_xlabel(path)
        ax.set_ylabel(f"{sw.metric} (last reported)")
        ax.set_title(f"{sw.stage} sweep: {sw.metric} vs {path}", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = plot_dir / f"{_safe(sw.metric)}_vs_{_safe(path)}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out.append(p)
    curve = sweepable_stage(sw.stage).sweep_curve
    if curve:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for r in rows:
            df = r["_progress"]
            if df is None or curve not in df or "step" not in df:
                continue
            d = df[["step", curve]].dropna()
            if len(d):
                ax.plot(d["step"], d[curve], marker=".", label=f"{r['trial_id'][-5:]} ({r['status']})",
                        linestyle="--" if r["status"] != "completed" else "-")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"validation {curve}")
        ax.set_title(f"{sw.stage} sweep: {curve} over steps per trial", fontsize=10)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = plot_dir / f"{_safe(curve)}_by_step.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        out.append(p)
    return out
