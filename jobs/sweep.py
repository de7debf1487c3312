"""`python -m jobs.sweep` = `stemqa sweep`, the `ray job submit` entry point: a Ray Tune sweep over a stage's settings
(a search space), with ASHA.

Options: `python -m jobs.sweep --help`. The work: stemqa/tune/sweep.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("sweep")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["sweep", *sys.argv[1:]])
