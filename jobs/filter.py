"""`stemqa filter`: keep the training samples most similar to the target sets (Ray Data embeddings + FAISS).

    stemqa filter --config demo [--records pool.jsonl] [--out DIR]

Without --records the pool is `data.train` from the config; without --out the result goes into the run
directory's `filter/` stage (recorded in its manifest).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from jobs.common import config_from, connect, open_run, parser, print_json
from stemqa.data.mcq import load_sources, read_records
from stemqa.data.paths import data_root
from stemqa.filter import load_targets, run_filter


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("stemqa filter", "embed samples with Ray Data and keep those similar to the target sets")
    p.add_argument("--records", help="MCQ records JSONL to filter (default: data.train from the config)")
    p.add_argument("--out", help="output directory (default: <run>/filter)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    root = data_root(cfg.data.root)
    records = read_records(args.records) if args.records else load_sources(cfg.data.train, root, cfg.data.skip_invalid)[0]
    targets = load_targets(cfg.filter, root, cfg.data.skip_invalid) if cfg.filter.enabled else {}
    connect(cfg)
    if args.out:
        result = run_filter(records, targets, cfg.filter, Path(args.out))
    else:
        run = open_run(args, cfg)
        with run.stage("filter", inputs={"records": args.records or "data.train"},
                       config=cfg.filter.model_dump(mode="json")) as st:
            result = run_filter(records, targets, cfg.filter, st.dir)
            for key in ("kept_path", "scores_path", "histogram", "embeddings"):
                if result[key]:
                    st.add_artifact(key.removesuffix("_path"), result[key])
            st.add_metrics(kept=result["kept"], total=result["total"], counts=result["counts"])
    print_json(result)
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
