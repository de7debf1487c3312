"""Retrieval-augmented generation: the corpus, its FAISS index, and retrieval for the prompt."""
from stemqa.rag.budget import passages_within_budget
from stemqa.rag.corpus import Chunk, CorpusError, build_chunks, chunk_document, load_documents
from stemqa.rag.index import build_index, read_manifest
from stemqa.rag.retriever import IndexLoadError, Passage, Retriever

__all__ = ["Chunk", "CorpusError", "IndexLoadError", "Passage", "Retriever", "build_chunks", "build_index",
           "chunk_document", "load_documents", "passages_within_budget", "read_manifest"]
