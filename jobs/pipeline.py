"""`python -m jobs.pipeline` = `stemqa pipeline`, the `ray job submit` entry point: every stage as real Ray work into
one run directory, then one question to the served model.

Options: `python -m jobs.pipeline --help`. The work: stemqa/pipeline.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("pipeline")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["pipeline", *sys.argv[1:]])
