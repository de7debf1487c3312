"""`stemqa dpo` / `python -m jobs.dpo`: DPO on Ray Train + DeepSpeed ZeRO, reference log-probs precomputed.

    python -m jobs.dpo --config demo --pairs DIR --out DIR [--model M] [--prepare] [--name dpo]

--pairs is a directory with train/val/test.jsonl (`prepare_pairs`); with --prepare it is first written from
the config's data.preference sources. Prints {"model_dir", "metrics"}.
"""
from __future__ import annotations

from pathlib import Path

from jobs.common import config_from, connect, fail, parser, print_json


def main(argv=None) -> int:
    p = parser("stemqa dpo", __doc__)
    p.add_argument("--pairs", required=True, help="directory of train/val/test.jsonl preference pairs")
    p.add_argument("--out", required=True, help="output directory: model/ and ray/ (checkpoints)")
    p.add_argument("--model", default=None, help="model DPO starts from (default: model.name; e.g. an SFT model dir)")
    p.add_argument("--prepare", action="store_true", help="first build --pairs from data.preference")
    p.add_argument("--name", default="dpo", help="Ray Train run name; the same name resumes (default: dpo)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    model = args.model or cfg.model.name
    prep = None
    if args.prepare:
        from stemqa.data.paths import data_root
        from stemqa.data.preference import prepare_pairs
        from stemqa.models.loader import load_tokenizer

        from stemqa.data.preference import PreferenceFormatError

        try:
            prep = prepare_pairs(cfg.data.preference, data_root(cfg.data.root), load_tokenizer(model), cfg.dpo,
                                 Path(args.pairs))
        except PreferenceFormatError as e:
            fail(str(e))
    connect(cfg)
    from stemqa.train.dpo import run_dpo

    result = run_dpo(cfg, Path(args.pairs), Path(args.out), base_model=model, run_name=args.name)
    result["metrics"].pop("sample_ids", None)
    if prep is not None:
        result["pairs"] = prep["counts"]
    print_json(result)
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
