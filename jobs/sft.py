"""`python -m jobs.sft` = `stemqa sft`, the `ray job submit` entry point: supervised fine-tuning on Ray Train +
DeepSpeed ZeRO (the same --out and --name resume).

Options: `python -m jobs.sft --help`. The work: stemqa/stages/sft.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("sft")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["sft", *sys.argv[1:]])
