"""`python -m jobs.serve` = `stemqa serve`, the `ray job submit` entry point: deploy the Ray Serve app (RAG + model)
and answer one sample question over HTTP.

Options: `python -m jobs.serve --help`. The work: stemqa/stages/serve.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("serve")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["serve", *sys.argv[1:]])
