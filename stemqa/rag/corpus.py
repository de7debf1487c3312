"""The RAG corpus: documents from several sources, chunked by embedder tokens, de-duplicated and capped.

Source kinds (`rag.corpus[].kind`):
- openstax: JSONL `{id, book, section, text}` (../shared/data/corpus); one document per paragraph.
- qasc_facts: QASC JSONL; its `fact1` and `fact2` are two documents per row.
- arc_para: ARC-layout JSONL; the `para` passage of each choice that has one (many have none).
- mcq_text: an MCQ file (`format`); the document is the question followed by the correct answer.
- jsonl: `{text, id?, source?}` per line.

Chunks are windows of `chunk_tokens` embedder tokens with `chunk_overlap` shared tokens (cut at token
offsets, so a chunk is a verbatim span of its document). Exact duplicates (same text up to case and spacing)
are dropped here; near-duplicates are dropped after embedding (`stemqa.rag.index`). Caps apply in config order.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from stemqa.config.schema import CorpusSource, RagConfig
from stemqa.data.mcq import load_file


class CorpusError(ValueError):
    """A corpus file or row that cannot be read; the message starts with `file:line:` when it is a row."""


@dataclass
class Document:
    text: str
    source: str
    doc_id: str


@dataclass
class Chunk:
    id: str
    text: str
    source: str
    doc_id: str
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _rows(path: Path, limit) -> Iterator[tuple[int, dict]]:
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and n >= limit:
                return
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object")
            n += 1
            yield lineno, obj


def _text(obj: dict, key: str, path: Path, lineno: int) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CorpusError(f"{path}:{lineno}: field '{key}' is missing or not a non-empty string")
    return value.strip()


def load_documents(src: CorpusSource, data_root: Path) -> list[Document]:
    """Read one configured corpus source into documents (`limit` counts rows of the file)."""
    path = Path(src.path) if Path(src.path).is_absolute() else Path(data_root) / src.path
    if not path.is_file():
        raise FileNotFoundError(f"rag.corpus: {path} ({src.kind}): no such file")
    label = src.name or f"{src.kind}:{path.stem}"
    docs: list[Document] = []
    if src.kind == "mcq_text":
        records, _ = load_file(path, src.format, limit=src.limit)
        return [Document(f"{q.question.strip()} {q.choices[q.answer].strip()}", label, q.id) for q in records]
    for lineno, obj in _rows(path, src.limit):
        row_id = str(obj.get("id", f"{path.stem}/{lineno}"))
        if src.kind == "openstax":
            docs.append(Document(_text(obj, "text", path, lineno), label, row_id))
        elif src.kind == "qasc_facts":
            for key in ("fact1", "fact2"):
                docs.append(Document(_text(obj, key, path, lineno), label, f"{row_id}/{key}"))
        elif src.kind == "arc_para":
            choices = (obj.get("question") or {}).get("choices")
            if not isinstance(choices, list):
                raise CorpusError(f"{path}:{lineno}: field 'question.choices' is missing or not a list")
            for c in choices:  # `para` is optional in ARC: choices without one add nothing
                para = c.get("para") if isinstance(c, dict) else None
                if isinstance(para, str) and para.strip():
                    docs.append(Document(para.strip(), label, f"{row_id}/{c.get('label', '?')}"))
        elif src.kind == "jsonl":
            docs.append(Document(_text(obj, "text", path, lineno), str(obj.get("source") or label), row_id))
        else:  # the schema's Literal rules this out; kept for a clear message if the two drift apart
            raise CorpusError(f"rag.corpus: unknown kind {src.kind!r}")
    return docs


def load_chunk_tokenizer(embedder: str):
    """The embedder's own (fast) tokenizer, so chunk lengths are counted in the tokens it will see."""
    from transformers import AutoTokenizer

    from stemqa.models import resolve_embedder

    return AutoTokenizer.from_pretrained(resolve_embedder(embedder))


def chunk_document(doc: Document, tokenizer, chunk_tokens: int, overlap: int) -> list[tuple[str, int]]:
    """(text, n_tokens) windows of `chunk_tokens` tokens, consecutive ones sharing `overlap` tokens."""
    if overlap >= chunk_tokens:
        raise CorpusError(f"rag.chunk_overlap ({overlap}) must be smaller than rag.chunk_tokens ({chunk_tokens})")
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = enc["offset_mapping"]
    if len(offsets) <= chunk_tokens:
        return [(doc.text, len(offsets))]
    out, step, start = [], chunk_tokens - overlap, 0
    while True:
        end = min(start + chunk_tokens, len(offsets))
        out.append((doc.text[offsets[start][0]: offsets[end - 1][1]].strip(), end - start))
        if end == len(offsets):
            return out
        start += step


def _dedup_key(text: str) -> str:
    return " ".join(text.lower().split())


def build_chunks(cfg: RagConfig, data_root: Path, tokenizer) -> tuple[list[Chunk], dict]:
    """All configured sources -> chunks (exact duplicates removed, caps applied) and their counts."""
    if not cfg.corpus:
        raise CorpusError("rag.corpus is empty: configure at least one corpus source")
    counts = {"documents": 0, "chunks_before_dedup": 0, "exact_duplicates": 0, "capped": 0}
    seen: set[str] = set()
    chunks: list[Chunk] = []
    tokens = 0
    for src in cfg.corpus:
        docs = load_documents(src, data_root)
        counts["documents"] += len(docs)
        for doc in docs:
            for text, n_tok in chunk_document(doc, tokenizer, cfg.chunk_tokens, cfg.chunk_overlap):
                counts["chunks_before_dedup"] += 1
                key = _dedup_key(text)
                if not key or key in seen:
                    counts["exact_duplicates"] += 1
                    continue
                if len(chunks) >= cfg.max_chunks or tokens + n_tok > cfg.max_tokens:
                    counts["capped"] += 1
                    continue
                seen.add(key)
                chunks.append(Chunk(f"c{len(chunks)}", text, doc.source, doc.doc_id, n_tok))
                tokens += n_tok
    if not chunks:
        raise CorpusError("rag.corpus: no chunks (every source was empty)")
    counts["chunks"], counts["tokens"] = len(chunks), tokens
    return chunks, counts


def corpus_hash(chunks: list[Chunk]) -> str:
    """Identity of the chunk list (texts, sources, doc ids, order)."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(json.dumps([c.source, c.doc_id, c.text], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def write_chunks(chunks: list[Chunk], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for c in chunks:
            f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")


def read_chunks(path: Path) -> list[Chunk]:
    chunks = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                chunks.append(Chunk(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as e:
                raise CorpusError(f"{path}:{lineno}: not a chunk record: {e}") from None
    return chunks
