"""rag: build the RAG corpus (chunks with their source) and its FAISS index, embedding with Ray Data; an index
already in the output directory is reused when its corpus and embedder are unchanged.

    stemqa rag [build] [--out DIR] [--force]
    stemqa rag query --index DIR [-k 3] "question" ["question" ...]     (in process, as Serve and eval retrieve)
    stemqa rag tune-embedder --out DIR [--steps 30] [--triplets 480]    (a Ray Train job; metrics before/after)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from stemqa.stages.base import Stage, StageContext, StageResult


class RagInputs(BaseModel):
    data_root: str
    force: bool = False  # rebuild even when the index in the output directory is up to date
    index_dir: Optional[str] = None  # where the index goes; None = <stage dir>/index (--out DIR: DIR itself)


class RagResult(StageResult):
    reused: bool = False  # the index in the output directory was up to date and kept
    corpus_hash: str = ""


class RagStage(Stage):
    name = "rag"
    Inputs = RagInputs
    description = "build the RAG corpus and FAISS index with Ray Data; query it"

    def add_arguments(self, p) -> None:
        p.add_argument("action", nargs="?", default="build", choices=["build", "query", "tune-embedder"])
        p.add_argument("questions", nargs="*", help="query: the question(s) to retrieve passages for")
        p.add_argument("--force", action="store_true", help="build: rebuild even if the index is up to date")
        p.add_argument("--index", help="query: index directory")
        p.add_argument("-k", type=int, default=None, help="query: passages per question (default: rag.top_k)")
        p.add_argument("--steps", type=int, default=30, help="tune-embedder: optimizer steps")
        p.add_argument("--triplets", type=int, default=480, help="tune-embedder: MMLU triplets to train on")
        p.add_argument("--qasc", type=int, default=300, help="tune-embedder: QASC dev questions for recall@5")

    def command(self, args, cfg) -> Optional[int]:
        from stemqa.cli.common import connect, fail, print_json

        if args.action == "query":
            from stemqa.rag import IndexLoadError, Retriever

            if not args.index or not args.questions:
                fail("rag query needs --index DIR and at least one question")
            try:
                retriever = Retriever.load(args.index)
            except IndexLoadError as e:
                fail(str(e))
            hits = retriever.search(args.questions, args.k or cfg.rag.top_k)
            print_json([{"question": q, "passages": [h.to_dict() for h in hs]} for q, hs in zip(args.questions, hits)])
            return 0
        if args.action == "tune-embedder":
            if not args.out:
                fail("rag tune-embedder needs --out DIR")
            from stemqa.data.paths import data_root
            from stemqa.rag.tune_embedder import tune_and_evaluate

            connect(cfg)
            print_json(tune_and_evaluate(data_root(cfg.data.root), Path(args.out), cfg.rag.embed.embedder,
                                         steps=args.steps, n_triplets=args.triplets, qasc_questions=args.qasc))
            return 0
        return None

    def inputs_from_args(self, args, ctx: StageContext) -> RagInputs:
        return RagInputs(data_root=str(ctx.data_root), force=args.force,
                         index_dir=str(Path(args.out).resolve()) if args.out else None)

    def inputs_from_run(self, ctx: StageContext) -> RagInputs:
        return RagInputs(data_root=str(ctx.data_root))

    def manifest_inputs(self, inputs: RagInputs, run) -> dict:
        return {"data_root": inputs.data_root}

    def run(self, ctx: StageContext, inputs: RagInputs) -> StageResult:
        from stemqa.rag import build_index, read_manifest

        out = Path(inputs.index_dir) if inputs.index_dir else Path(ctx.out_dir) / "index"
        before = read_manifest(out) if (out / "manifest.json").exists() else None
        index = build_index(ctx.cfg.rag, Path(inputs.data_root), out, force=inputs.force,
                            progress=ctx.progress.callback("rag: embed", "chunks"))
        manifest = read_manifest(index)
        counts = manifest.get("counts", {})
        reused = before is not None and before.get("built_at") == manifest["built_at"]
        return RagResult(summary=f"{counts.get('chunks')} chunks, {manifest.get('embedder')}",
                         artifacts={"index": str(index)}, metrics={"chunks": counts.get("chunks")}, reused=reused,
                         corpus_hash=manifest["corpus_hash"])

    def show(self, result: RagResult) -> None:
        index = result.artifacts["index"]
        manifest = json.loads((Path(index) / "manifest.json").read_text())
        print(json.dumps({"index": index, "reused": result.reused, "embedder": manifest["embedder"],
                          "counts": manifest["counts"], "corpus_hash": result.corpus_hash}, indent=2))


STAGE = RagStage()
