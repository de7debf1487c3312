"""Query a saved index: `Retriever.load(index_dir).search(questions, k)`.

In process and without Ray: the Serve app and the evaluator call it per request, so the embedder is loaded
once at `load` and every search is one batched encode plus one FAISS search. Loading checks the directory
against its manifest (embedder, dimension, row counts) and fails with `IndexLoadError` saying what differs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from stemqa.embed import embed_local
from stemqa.rag.corpus import CorpusError, read_chunks
from stemqa.rag.index import FORMAT


class IndexLoadError(RuntimeError):
    """An index directory that cannot be used: missing, corrupt, or built with another embedder."""


@dataclass
class Passage:
    text: str
    source: str
    score: float  # cosine similarity (metric cosine) or minus the squared L2 distance (metric l2): higher = closer
    doc_id: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _embedder_key(name: str) -> str:
    name = name.strip()
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name.lower().removeprefix("sentence-transformers/")


class Retriever:
    def __init__(self, index, chunks, manifest: dict, model, index_dir: Path):
        self.index, self.chunks, self.manifest, self.model, self.index_dir = index, chunks, manifest, model, index_dir
        self.metric = manifest["metric"]

    @classmethod
    def load(cls, index_dir, embedder: Optional[str] = None, device: Optional[str] = None) -> "Retriever":
        """Open `index_dir`; `embedder`, when given, must be the one the index was built with."""
        import faiss

        from stemqa.models import load_embedder

        d = Path(index_dir)
        mpath = d / "manifest.json"
        if not mpath.is_file():
            raise IndexLoadError(f"{d}: not an index directory (no manifest.json; build it with `stemqa rag build`)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise IndexLoadError(f"{mpath}: corrupt manifest ({e})") from None
        missing = [k for k in ("format", "embedder", "dim", "metric", "counts") if k not in manifest]
        if missing or manifest["format"] != FORMAT:
            raise IndexLoadError(f"{mpath}: not a {FORMAT} manifest (missing {missing or 'nothing'}, "
                                 f"format {manifest.get('format')!r})")
        if embedder is not None and _embedder_key(embedder) != _embedder_key(manifest["embedder"]):
            raise IndexLoadError(f"{d}: built with embedder {manifest['embedder']!r}, asked to query with "
                                 f"{embedder!r}; rebuild the index with that embedder or use the index's")
        try:
            index = faiss.read_index(str(d / "index.faiss"))
        except RuntimeError as e:
            raise IndexLoadError(f"{d / 'index.faiss'}: cannot be read as a FAISS index: "
                                 f"{str(e).strip().splitlines()[-1]}") from None
        try:
            chunks = read_chunks(d / "chunks.jsonl")
        except (OSError, CorpusError) as e:
            raise IndexLoadError(f"{d}: chunks.jsonl: {e}") from None
        if index.d != manifest["dim"]:
            raise IndexLoadError(f"{d}: index.faiss has dim {index.d}, the manifest says {manifest['dim']}")
        if not index.ntotal == len(chunks) == manifest["counts"].get("chunks"):
            raise IndexLoadError(f"{d}: mismatched files: index.faiss has {index.ntotal} vectors, chunks.jsonl "
                                 f"{len(chunks)} rows, the manifest {manifest['counts'].get('chunks')} chunks")
        settings = manifest.get("index", {})
        if hasattr(index, "nprobe"):
            index.nprobe = settings.get("ivf_nprobe", 16)
        if hasattr(index, "hnsw"):
            index.hnsw.efSearch = settings.get("hnsw_ef_search", 64)
        model = load_embedder(manifest["embedder"], device=device)
        dim = model.get_embedding_dimension()
        if dim != manifest["dim"]:
            raise IndexLoadError(f"{d}: embedder {manifest['embedder']!r} now gives {dim}-dim vectors, the index "
                                 f"holds {manifest['dim']}-dim ones")
        return cls(index, chunks, manifest, model, d)

    @property
    def embedder(self) -> str:
        return self.manifest["embedder"]

    def __len__(self) -> int:
        return len(self.chunks)

    def search(self, queries: Sequence[str], k: int) -> list[list[Passage]]:
        """Top-k passages for each query, best first."""
        if isinstance(queries, str):
            raise TypeError("Retriever.search: expected a list of queries, got one string")
        if not queries:
            return []
        if k < 1:
            raise ValueError(f"Retriever.search: k must be >= 1, got {k}")
        vectors = embed_local(list(queries), self.model)
        scores, ids = self.index.search(vectors, min(k, len(self.chunks)))
        sign = 1.0 if self.metric == "cosine" else -1.0
        out = []
        for row_scores, row_ids in zip(scores, ids):
            out.append([Passage(self.chunks[i].text, self.chunks[i].source, sign * float(s), self.chunks[i].doc_id)
                        for s, i in zip(row_scores, row_ids) if i >= 0])  # -1: fewer hits than k (ivf/hnsw)
        return out
