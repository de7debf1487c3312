"""`python -m jobs.filter` = `stemqa filter`, the `ray job submit` entry point: embed samples with Ray Data and keep
those similar to the target sets (FAISS).

Options: `python -m jobs.filter --help`. The work: stemqa/stages/filter.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("filter")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["filter", *sys.argv[1:]])
