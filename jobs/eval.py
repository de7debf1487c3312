"""`stemqa eval`: MCQ accuracy of a model on the config's eval sets, as a Ray task (or in-process with --local).

    stemqa eval --config demo --model smollm2-135m-instruct [--out DIR] [--local]

Writes <out>/<set>/metrics.json and predictions.jsonl and prints a per-set table. Without --out the results go
to the run directory (<run>/eval/<model>/) and are recorded in its manifest.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from jobs.common import config_from, connect, open_run, parser


def table(results: dict) -> str:
    rows = [f"{'set':<16} {'n':>5} {'accuracy':>9} {'q/s':>7}  subjects"]
    for name, m in results.items():
        subjects = ", ".join(f"{s} {v['accuracy']:.2f}" for s, v in m["per_subject"].items())
        rows.append(f"{name:<16} {m['n']:>5} {m['accuracy']:>9.3f} {m['questions_per_s'] or 0:>7.1f}  {subjects}")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("stemqa eval", "MCQ accuracy by answer-letter log-likelihood (lm-eval compatible), per eval set.")
    p.add_argument("--model", default=None, help="model name, local dir or .gguf (default: the config's model.name)")
    p.add_argument("--out", default=None, help="output directory (default: <run>/eval/<model>)")
    p.add_argument("--local", action="store_true", help="run in this process instead of as a Ray task")
    args = p.parse_args(argv)
    cfg = config_from(args)
    model = args.model or cfg.model.name

    from stemqa.data.paths import data_root
    from stemqa.eval.run import evaluate_sets, evaluate_sets_remote

    root = data_root(cfg.data.root)
    run = None
    if args.out:
        out = Path(args.out)
    else:
        run = open_run(args, cfg)
        out = run.stage_dir("eval") / re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or model)

    def go() -> dict:
        if args.local:
            return evaluate_sets(model, cfg, root, out)
        import ray

        connect(cfg)
        return ray.get(evaluate_sets_remote(model, cfg, root, out))

    if run is None:
        results = go()
    else:
        with run.stage("eval", inputs={"model": model, "data_root": str(root)}, config=cfg.eval.model_dump()) as st:
            results = go()
            st.add_artifact("results", out)
            st.add_metrics(**{name: m["accuracy"] for name, m in results.items()})
    print(table(results))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
