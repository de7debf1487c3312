"""`python -m jobs.eval` = `stemqa eval`, the `ray job submit` entry point: MCQ accuracy of a model on the eval sets
(or --data FILE), as Ray tasks.

Options: `python -m jobs.eval --help`. The work: stemqa/stages/eval.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("eval")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["eval", *sys.argv[1:]])
