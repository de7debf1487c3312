"""`stemqa data`: load the configured MCQ sources (or given files), validate every row, write records JSONL."""
from __future__ import annotations

from pathlib import Path

from jobs.common import config_from, parser
from stemqa.config.schema import McqSource
from stemqa.data.mcq import PARSERS, load_sources, write_records
from stemqa.data.paths import data_root


def main(argv=None) -> int:
    p = parser("stemqa data", __doc__)
    p.add_argument("files", nargs="*", help="files to load instead of the config's data.train")
    p.add_argument("--format", choices=sorted(PARSERS), help="format of the given files")
    p.add_argument("--skip-invalid", action="store_true", help="skip malformed rows (counted) instead of failing")
    p.add_argument("--out", default=None, help="write the records here (JSONL)")
    args = p.parse_args(argv)
    cfg = config_from(args)
    if args.files and not args.format:
        p.error("--format is required with files")
    sources = [McqSource(path=str(Path(f).resolve()), format=args.format) for f in args.files] or cfg.data.train
    records, reports = load_sources(sources, data_root(cfg.data.root), args.skip_invalid or cfg.data.skip_invalid)
    for rep in reports:
        print(rep.summary())
    print(f"total: {len(records)} records")
    if args.out:
        write_records(records, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
