"""`python -m jobs.dpo` = `stemqa dpo`, the `ray job submit` entry point: DPO on Ray Train + DeepSpeed ZeRO, reference
log-probs precomputed by Ray Data.

Options: `python -m jobs.dpo --help`. The work: stemqa/stages/dpo.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("dpo")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["dpo", *sys.argv[1:]])
