"""`python -m jobs.data` = `stemqa data`, the `ray job submit` entry point: load and validate MCQ sources; write them
as records JSONL.

Options: `python -m jobs.data --help`. The work: stemqa/stages/data.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("data")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["data", *sys.argv[1:]])
