"""`python -m jobs.rag` = `stemqa rag`, the `ray job submit` entry point: build the RAG corpus and FAISS index with
Ray Data; query it; tune the embedder.

Options: `python -m jobs.rag --help`. The work: stemqa/stages/rag.py.
"""
import sys

from stemqa.cli import command_main
from stemqa.cli import main as cli

main = command_main("rag")  # main(argv) -> exit status, for Python callers

if __name__ == "__main__":
    cli(["rag", *sys.argv[1:]])
