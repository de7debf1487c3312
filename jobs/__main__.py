"""`python -m jobs <stage> ...` = `stemqa <stage> ...`: the `ray job submit` entry point of any stage, including
one added since (a module of stemqa/stages); `python -m jobs.<stage>` is the same for the stages listed here."""
import sys

from stemqa.cli import main

main(sys.argv[1:])
