"""`stemqa rag`: build the RAG corpus index with Ray Data + FAISS, or query one.

    stemqa rag build --config demo [--out DIR] [--force]
    stemqa rag query --index DIR [-k 3] "question" ["question" ...]
    stemqa rag tune-embedder --out DIR [--steps 30] [--triplets 480]

`build` reuses an index already in DIR when its corpus and embedder are unchanged; without --out it goes
into the run directory's `rag/` stage. `query` runs in process (no Ray), as Serve and the evaluator do.
`tune-embedder` fine-tunes rag.embed.embedder on MMLU subject triplets as a Ray Train job, writes the model to
DIR/model (usable as any `embedder`) and prints retrieval metrics before and after on held-out data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from jobs.common import config_from, connect, fail, open_run, parser, print_json
from stemqa.data.paths import data_root
from stemqa.rag import Retriever, build_index, read_manifest


def main(argv: Optional[list[str]] = None) -> int:
    p = parser("stemqa rag", "build the RAG corpus and FAISS index with Ray Data; query it; tune the embedder")
    p.add_argument("action", choices=["build", "query", "tune-embedder"])
    p.add_argument("questions", nargs="*", help="query: the question(s) to retrieve passages for")
    p.add_argument("--out", help="build: index directory (default: <run>/rag); tune-embedder: output directory")
    p.add_argument("--force", action="store_true", help="build: rebuild even if the index is up to date")
    p.add_argument("--index", help="query: index directory")
    p.add_argument("-k", type=int, default=None, help="query: passages per question (default: rag.top_k)")
    p.add_argument("--steps", type=int, default=30, help="tune-embedder: optimizer steps")
    p.add_argument("--triplets", type=int, default=480, help="tune-embedder: MMLU triplets to train on")
    p.add_argument("--qasc", type=int, default=300, help="tune-embedder: QASC dev questions for recall@5")
    args = p.parse_intermixed_args(argv)  # the question may follow the options
    cfg = config_from(args)

    if args.action == "query":
        if not args.index or not args.questions:
            fail("rag query needs --index DIR and at least one question")
        from stemqa.rag import IndexLoadError

        try:
            retriever = Retriever.load(args.index)
        except IndexLoadError as e:
            fail(str(e))
        hits = retriever.search(args.questions, args.k or cfg.rag.top_k)
        print_json([{"question": q, "passages": [h.to_dict() for h in hs]} for q, hs in zip(args.questions, hits)])
        return 0

    root = data_root(cfg.data.root)
    if args.action == "tune-embedder" and not args.out:
        fail("rag tune-embedder needs --out DIR")
    connect(cfg)
    if args.action == "tune-embedder":
        from stemqa.rag.tune_embedder import tune_and_evaluate

        print_json(tune_and_evaluate(root, Path(args.out), cfg.rag.embed.embedder, steps=args.steps,
                                     n_triplets=args.triplets, qasc_questions=args.qasc))
        return 0
    before = read_manifest(Path(args.out)) if args.out and (Path(args.out) / "manifest.json").exists() else None
    if args.out:
        out = build_index(cfg.rag, root, Path(args.out), force=args.force)
    else:
        run = open_run(args, cfg)
        with run.stage("rag", config=cfg.rag.model_dump(mode="json")) as st:
            out = build_index(cfg.rag, root, st.dir / "index", force=args.force)
            st.add_artifact("index", out)
            st.add_metrics(**read_manifest(out)["counts"])
    manifest = read_manifest(out)
    reused = before is not None and before.get("built_at") == manifest["built_at"]
    print_json({"index": str(out), "reused": reused, "embedder": manifest["embedder"], "counts": manifest["counts"],
                "corpus_hash": manifest["corpus_hash"]})
    return 0


if __name__ == "__main__":
    from jobs.common import run_main

    run_main(main)
