"""One self-contained HTML page per run: the plots and tables people look for, images inline (no CDN).

    write_report(run_dir, out=None, compare=[other_run_dirs])  ->  <run>/report.html

Sections: stages (status, time), train loss over steps per stage (curves of `compare` runs overlaid, labelled
by the config values that differ, e.g. grad_accum 1 vs 4), DPO validation reward accuracy and margin over steps,
the eval table per subject, the quantization trade-off (accuracy vs model size), retrieval metrics, and the
filter's score histogram. Everything is read from the run directory (manifest + stage artifacts), so a report
can be written for any finished or partly finished run, on any machine that has its directory.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path
from typing import Optional, Sequence

from stemqa.runs import Run
from stemqa.tracking import read_rows
from stemqa.train.history import TrainHistory, read_history

TRAIN_STAGES = ("sft", "dpo")


# ---------------------------------------------------------------- reading a run
def dir_size_mb(path) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.exists() else []
    return sum(f.stat().st_size for f in files) / 2**20


def stage_history(run: Run, stage: str) -> Optional[TrainHistory]:
    """A training stage's per-step history (its `history` artifact), if it has one."""
    path = run.manifest()["stages"].get(stage, {}).get("artifacts", {}).get("history")
    return read_history(str(run.path / path)) if path else None


def loss_series(run: Run, stage: str) -> list[tuple[int, float]]:
    """(step, train loss) of a stage: metrics.jsonl when tracking wrote it, else the stage's history file."""
    rows = [(r["step"], r["train/loss"]) for r in read_rows(run.path, stage) if r.get("step") and "train/loss" in r]
    if rows:
        return rows
    history = stage_history(run, stage)
    return [(s.step, s.loss) for s in history.steps] if history else []


def dpo_evals(run: Run) -> list[dict]:
    history = stage_history(run, "dpo")
    return history.eval_dicts() if history else []


def eval_results(run: Run) -> dict[str, dict[str, dict]]:
    """{model: {eval set: metrics.json}} from <run>/eval/<model>/<set>/metrics.json."""
    out: dict[str, dict[str, dict]] = {}
    eval_dir = run.path / "eval"
    for f in sorted(eval_dir.glob("*/*/metrics.json")) if eval_dir.exists() else []:
        try:
            out.setdefault(f.parent.parent.name, {})[f.parent.name] = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
    return out


def _differing(runs: Sequence[Run], stage: str) -> dict[str, str]:
    """Label per run: the stage config values that differ between the runs (or the run id when none do)."""
    cfgs = {r.id: _flat(r.manifest()["stages"].get(stage, {}).get("config", {})) for r in runs}
    keys = sorted({k for c in cfgs.values() for k in c if len({json.dumps(cc.get(k)) for cc in cfgs.values()}) > 1})
    keys = [k for k in keys if not k.startswith("resources.") or "grad_accum" in k][:3] or keys[:3]
    return {rid: ", ".join(f"{k}={c.get(k)}" for k in keys) or rid for rid, c in cfgs.items()}


def _labels(runs: Sequence[Run], stage: str) -> dict[str, str]:
    return _differing(runs, stage) if len(runs) > 1 else {r.id: r.id for r in runs}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    _plt().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def loss_figure(runs: Sequence[Run]) -> Optional[str]:
    stages = [s for s in TRAIN_STAGES if any(loss_series(r, s) for r in runs)]
    if not stages:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        with_stage = [r for r in runs if loss_series(r, stage)]
        labels = _labels(with_stage, stage)
        for r in with_stage:
            pts = loss_series(r, stage)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None,
                        label=labels[r.id])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{stage}: train loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def dpo_figure(runs: Sequence[Run]) -> Optional[str]:
    if not any(dpo_evals(r) for r in runs):
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    runs = [r for r in runs if dpo_evals(r)]
    labels = _labels(runs, "dpo")
    fig, (acc_ax, margin_ax) = plt.subplots(1, 2, figsize=(12, 3.8))
    for r in runs:
        evs = dpo_evals(r)
        if evs:
            steps = [e["step"] for e in evs]
            acc_ax.plot(steps, [e["reward_accuracy"] for e in evs], marker="o", label=labels[r.id])
            margin_ax.plot(steps, [e["reward_margin"] for e in evs], marker="o", label=labels[r.id])
    for ax, what in ((acc_ax, "reward accuracy"), (margin_ax, "reward margin")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"dpo: validation {what}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    acc_ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    return _png(fig)


def quant_points(run: Run) -> list[dict]:
    """(model, size MB, accuracy per eval set) for each evaluated model whose weights are in the run."""
    stages = run.manifest()["stages"]
    results = eval_results(run)
    pts = []
    for model, sets in results.items():
        st = stages.get(model, {})
        if st.get("status") != "done" or "model" not in st.get("artifacts", {}):
            continue
        size = st.get("metrics", {}).get("size_mb") or dir_size_mb(run.path / st["artifacts"]["model"])
        label = model if model != "quant" else f"quant ({st['metrics'].get('method')}, {st['metrics'].get('bits')}-bit)"
        pts.append({"model": label, "size_mb": float(size), "accuracy": {s: m["accuracy"] for s, m in sets.items()}})
    return pts


def quant_figure(run: Run) -> Optional[str]:
    if run.manifest()["stages"].get("quant", {}).get("status") != "done":
        return None
    pts = quant_points(run)
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sets = sorted({s for p in pts for s in p["accuracy"]})
    for s in sets:
        xs = [p["size_mb"] for p in pts if s in p["accuracy"]]
        ys = [p["accuracy"][s] for p in pts if s in p["accuracy"]]
        ax.scatter(xs, ys, label=s, s=40)
    for p in pts:
        ax.annotate(p["model"], (p["size_mb"], max(p["accuracy"].values())), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.margins(x=0.25, y=0.15)  # room for the labels
    ax.set_xlabel("model size on disk (MB)")
    ax.set_ylabel("accuracy")
    ax.set_title("quantization trade-off: accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------- HTML
def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def eval_table(run: Run) -> Optional[str]:
    results = eval_results(run)
    cols = [(m, s) for m, sets in results.items() for s in sets]
    if not cols:
        return None
    subjects = sorted({subj for m, s in cols for subj in results[m][s].get("per_subject", {})})
    rows = [["all (n)", *[f"{results[m][s]['accuracy']:.3f} ({results[m][s].get('n', '?')})" for m, s in cols]]]
    for subj in subjects:
        row = [subj]
        for m, s in cols:
            v = results[m][s].get("per_subject", {}).get(subj)
            row.append(f"{v['accuracy']:.3f} ({v['n']})" if v else "")
        rows.append(row)
    return _table(["subject", *[f"{m} / {s}" for m, s in cols]], rows)


def _scalars(d: dict) -> list[list]:
    return [[k, v] for k, v in _flat(d).items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]


def retrieval_section(run: Run) -> Optional[str]:
    st = run.manifest()["stages"].get("rag")
    if not st:
        return None
    rows = _scalars(st.get("metrics", {}))
    index = st.get("artifacts", {}).get("index")
    if index and (run.path / index / "manifest.json").exists():
        idx = json.loads((run.path / index / "manifest.json").read_text())
        rows += [[f"index.{k}", v] for k, v in _scalars(idx) if len(str(v)) < 120]
    return _table(["retrieval metric", "value"], rows) if rows else None


def model_card_section(run: Run) -> Optional[str]:
    """The select stage's model card (markdown) as HTML."""
    card = run.path / "model_card.md"
    if run.stage_status("select") != "done" or not card.exists():
        return None
    from markdown_it import MarkdownIt

    # html=False: the card's text is escaped, never passed through as markup
    return MarkdownIt("commonmark", {"html": False}).enable("table").render(card.read_text(encoding="utf-8"))


def stages_table(run: Run) -> str:
    rows = []
    for name, st in run.manifest()["stages"].items():
        secs = (st.get("ended") or time.time()) - st.get("started", time.time())
        keys = [k for k, v in st.get("metrics", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        summary = ", ".join(f"{k}={st['metrics'][k]:.4g}" for k in keys[:6])
        rows.append([name, st.get("status", "?"), f"{secs:.0f} s", summary or st.get("error", "")])
    return _table(["stage", "status", "time", "key metrics"], rows)


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:13px}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee;margin:.3em 0}h2{margin-top:1.6em}"""


def render(run: Run, compare: Sequence[Run] = ()) -> str:
    runs = [run, *compare]
    m = run.manifest()
    parts = [f"<h1>stemqa run {html.escape(run.id)}</h1>",
             f"<p>preset <b>{html.escape(str(m.get('name')))}</b>, created "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(m.get('created', 0)))}, directory "
             f"<code>{html.escape(str(run.path))}</code>"
             + (f"; compared with {html.escape(', '.join(r.id for r in compare))}" if compare else "") + "</p>",
             "<h2>Stages</h2>", stages_table(run)]
    sections = [
        ("Train loss over steps", lambda: loss_figure(runs), "img"),
        ("DPO validation reward accuracy and margin", lambda: dpo_figure(runs), "img"),
        ("Evaluation per subject (accuracy, n)", lambda: eval_table(run), "html"),
        ("Model card: what is served and why", lambda: model_card_section(run), "html"),
        ("Quantization trade-off", lambda: quant_figure(run), "img"),
        ("Retrieval", lambda: retrieval_section(run), "html"),
    ]
    for title, build, kind in sections:
        content = build()
        parts.append(f"<h2>{title}</h2>")
        if content is None:
            parts.append("<p><i>not in this run</i></p>")
        else:
            parts.append(_img(content, title) if kind == "img" else content)
    hist = m["stages"].get("filter", {}).get("artifacts", {}).get("histogram")
    if hist and (run.path / hist).exists():
        parts += ["<h2>Filter scores</h2>", _img(base64.b64encode((run.path / hist).read_bytes()).decode(), "filter")]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>stemqa {html.escape(run.id)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run_path, out=None, compare: Sequence = ()) -> Path:
    """Write the report of the run at `run_path` (to `out`, default <run>/report.html); `compare`: other run
    directories whose training curves are overlaid. Returns the HTML path."""
    run = Run(run_path)
    out = Path(out) if out else run.path / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(run, [Run(p) for p in compare]), encoding="utf-8")
    return out
