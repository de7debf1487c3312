"""`stemqa runs`: list runs (id, preset, stages done, key metrics, age, size); `stemqa runs show <id>`: one run's
stages, their configs, artifacts and lineage (which stage's artifact each stage consumed).

Runs are the directories with a manifest.json under cluster.storage_path (`--storage` overrides it).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from stemqa.config import load_config
from stemqa.report import dir_size_mb
from stemqa.runs import Run


def list_runs(storage) -> list[Run]:
    root = Path(storage).expanduser()
    if not root.is_dir():
        return []
    runs = [Run(p) for p in root.iterdir() if (p / "manifest.json").exists()]
    return sorted(runs, key=lambda r: r.manifest().get("created", 0), reverse=True)


def key_metrics(manifest: dict) -> str:
    """The few numbers people compare runs by: final train losses, DPO val accuracy, eval accuracies."""
    st = manifest["stages"]
    out = []
    for stage in ("sft", "dpo"):
        loss = st.get(stage, {}).get("metrics", {}).get("train_loss_last")
        if isinstance(loss, (int, float)):
            out.append(f"{stage} loss {loss:.3f}")
    acc = st.get("dpo", {}).get("metrics", {}).get("val_reward_accuracy_best")
    if isinstance(acc, (int, float)):
        out.append(f"dpo val acc {acc:.2f}")
    out += [f"{k} {v:.3f}" for k, v in st.get("eval", {}).get("metrics", {}).items() if isinstance(v, float)]
    return "; ".join(out)


def _age(seconds: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"


def lineage(manifest: dict) -> list[tuple[str, str, str]]:
    """(consumer stage, input name, producer 'stage.artifact' or the external value) for every stage input."""
    produced = {path: f"{stage}.{key}" for stage, st in manifest["stages"].items()
                for key, path in st.get("artifacts", {}).items()}
    out = []
    for stage, st in manifest["stages"].items():
        for name, value in st.get("inputs", {}).items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                v = str(v)
                src = produced.get(v) or next((p for a, p in produced.items() if v.startswith(a + "/")), None)
                if src is None and "model" in manifest["stages"].get(v, {}).get("artifacts", {}):
                    src = f"{v}.model"  # eval names the models it scored by stage
                out.append((stage, name, src or f"external: {v}"))
    return out


def print_list(runs: list[Run]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"stemqa runs ({len(runs)})")
    for col in ("id", "preset", "stages done", "key metrics", "age", "size"):
        table.add_column(col, justify="right" if col in ("age", "size") else "left")
    for r in runs:
        m = r.manifest()
        done = [s for s, st in m["stages"].items() if st.get("status") == "done"]
        bad = [f"{s} ({st['status']})" for s, st in m["stages"].items() if st.get("status") != "done"]
        table.add_row(r.id, str(m.get("name", "")), ", ".join(done + bad), key_metrics(m),
                      _age(time.time() - m.get("created", time.time())), f"{dir_size_mb(r.path):.1f} MB")
    Console(width=200).print(table)


def print_show(run: Run, full_config: bool = False) -> None:
    m = run.manifest()
    print(f"run {run.id}  preset {m.get('name')}  at {run.path}")
    for stage, st in m["stages"].items():
        secs = (st.get("ended") or time.time()) - st.get("started", time.time())
        error = f"  error: {st['error']}" if st.get("error") else ""
        print(f"\n[{stage}] {st.get('status')} in {secs:.0f} s{error}")
        cfg = st.get("config", {})
        text = json.dumps(cfg, default=str) if full_config else json.dumps(cfg, default=str)[:300]
        print(f"  config: {text}")
        for key, path in st.get("artifacts", {}).items():
            print(f"  artifact {key}: {path}")
        scalars = {k: v for k, v in st.get("metrics", {}).items() if isinstance(v, (int, float, str))}
        if scalars:
            print("  metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in scalars.items()))
    print("\nlineage:")
    for stage, name, src in lineage(m):
        print(f"  {src} -> {stage} ({name})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="stemqa runs", description=__doc__)
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    p.add_argument("run", nargs="?", help="run id (under the storage path) or run directory, for `show`")
    p.add_argument("--config", "--preset", dest="config", default="demo", help="preset or YAML (for storage_path)")
    p.add_argument("--storage", default=None, help="runs directory (default: the config's cluster.storage_path)")
    p.add_argument("--json", action="store_true", help="print the manifest(s) as JSON")
    p.add_argument("--full-config", action="store_true", help="show: print each stage's whole config")
    args = p.parse_args(argv)
    storage = Path(args.storage or load_config(args.config, []).cluster.storage_path)
    if args.action == "list":
        runs = list_runs(storage)
        if args.json:
            print(json.dumps([r.manifest() for r in runs], indent=2, default=str))
        elif not runs:
            print(f"no runs under {storage.resolve()}")
        else:
            print_list(runs)
        return 0
    if not args.run:
        p.error("show needs a run id")
    path = Path(args.run) if (Path(args.run) / "manifest.json").exists() else storage / args.run
    run = Run(path)  # FileNotFoundError names the directory
    if args.json:
        print(json.dumps(run.manifest(), indent=2, default=str))
    else:
        print_show(run, args.full_config)
    return 0

