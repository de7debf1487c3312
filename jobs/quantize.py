"""`python -m jobs.quantize` = `stemqa quantize`, the `ray job submit` entry point: quantize a model (GPTQ,
SmoothQuant+GPTQ, int8, bitsandbytes, QAT) as a Ray task.

Options: `python -m jobs.quantize --help`. The work: stemqa/stages/quant.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("quantize")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["quantize", *sys.argv[1:]])
