"""`stemqa sft` / `python -m jobs.sft`: supervised fine-tuning on Ray Train + DeepSpeed ZeRO.

    python -m jobs.sft --config demo --train records.jsonl --out DIR [--model M] [--name sft]

Re-running with the same --out and --name resumes from the last checkpoint. Prints {"model_dir", "metrics"}.
"""
from __future__ import annotations

from pathlib import Path

from jobs.common import config_from, connect, parser, print_json


def main(argv=None) -> int:
    p = parser("stemqa sft", __doc__)
    p.add_argument("--train", required=True, help="JSONL of MCQ records (stemqa data's output), or of {question, answer} with sft.data=qa")
    p.add_argument("--out", required=True, help="output directory: model/ and ray/ (checkpoints)")
    p.add_argument("--model", default=None, help="model to fine-tune (default: model.name from the config)")
    p.add_argument("--name", default="sft", help="Ray Train run name; the same name resumes (default: sft)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    if not Path(args.train).is_file():
        raise FileNotFoundError(f"{args.train}: no such training file")
    connect(cfg)
    from stemqa.train.sft import run_sft

    result = run_sft(cfg, Path(args.train), Path(args.out), base_model=args.model, run_name=args.name)
    result["metrics"].pop("sample_ids", None)
    print_json(result)
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
