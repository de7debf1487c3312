"""The RAG corpus, its FAISS index and retrieval, on real QASC facts and OpenStax paragraphs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from stemqa.config.schema import CorpusSource, EmbedConfig, RagConfig
from stemqa.rag import (
    CorpusError,
    IndexLoadError,
    Passage,
    Retriever,
    build_index,
    chunk_document,
    load_documents,
    passages_within_budget,
)
from stemqa.rag.corpus import Document, load_chunk_tokenizer
from stemqa.rag.index import make_faiss_index

QASC = "mcq/qasc/dev.jsonl"
N_QASC = 60


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_chunk_tokenizer("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def long_text(shared_data):
    """A long document of varied sentences (ARC questions, not otherwise in the corpus), so no window of it
    is a near-duplicate of another."""
    rows = [json.loads(line) for line in (shared_data / "mcq/arc/ARC-Easy-dev.jsonl").open()][:25]
    return " ".join(r["question"]["stem"] for r in rows)


@pytest.fixture(scope="module")
def corpus_cfg(shared_data, long_text, tmp_path_factory):
    """QASC facts + OpenStax + a file with a long document, an exact and a near duplicate of a QASC fact."""
    first = json.loads((shared_data / QASC).open().readline())
    extra = tmp_path_factory.mktemp("corpus") / "extra.jsonl"
    rows = [{"id": "long", "text": long_text, "source": "notes"},
            {"id": "exact", "text": "  " + first["fact1"].upper().replace(" ", "   ") + " "},  # case/spacing only
            {"id": "near", "text": first["fact1"].rstrip(".") + "!"}]
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return RagConfig(
        corpus=[CorpusSource(kind="qasc_facts", path=QASC, limit=N_QASC),
                CorpusSource(kind="openstax", path="corpus/openstax_chemistry.jsonl", limit=60, name="chemistry"),
                CorpusSource(kind="jsonl", path=str(extra))],
        chunk_tokens=64, chunk_overlap=16, near_dup_threshold=0.95,
        embed=EmbedConfig(batch_size=64, num_actors=1, cpus_per_actor=0.5),
    )


@pytest.fixture(scope="module")
def built(ray_local, shared_data, corpus_cfg, tmp_path_factory):
    return build_index(corpus_cfg, shared_data, tmp_path_factory.mktemp("index") / "idx")


def _chunks(index_dir):
    return [json.loads(line) for line in (index_dir / "chunks.jsonl").open()]


def test_index_manifest_counts_and_dedup(built, long_text):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["embedder"] == "all-MiniLM-L6-v2" and manifest["dim"] == 384
    assert manifest["normalized"] is True and manifest["metric"] == "cosine" and manifest["index"]["type"] == "flat"
    counts, chunks = manifest["counts"], _chunks(built)
    assert counts["chunks"] == len(chunks) == sum(counts["by_source"].values())
    assert counts["exact_duplicates"] >= 1 and counts["near_duplicates"] >= 1
    ids = {c["doc_id"] for c in chunks}
    assert "exact" not in ids and "near" not in ids  # the QASC fact they copy came first and stays
    assert set(counts["by_source"]) == {"qasc_facts:dev", "chemistry", "notes"}
    long_parts = [c for c in chunks if c["doc_id"] == "long"]
    assert len(long_parts) >= 3 and all(c["n_tokens"] <= 64 for c in chunks)
    spans = [(long_text.index(c["text"]), long_text.index(c["text"]) + len(c["text"])) for c in long_parts]
    assert spans[0][0] == 0 and spans[-1][1] == len(long_text)  # verbatim spans covering the document
    assert all(a[0] < b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # each window overlaps the previous one


def test_index_is_reused_not_rebuilt(built, shared_data, corpus_cfg):
    stamp = (built / "index.faiss").stat().st_mtime_ns
    assert build_index(corpus_cfg, shared_data, built) == built
    assert (built / "index.faiss").stat().st_mtime_ns == stamp


def test_retrieves_the_gold_qasc_fact(built, shared_data):
    retriever = Retriever.load(built)
    rows = [json.loads(line) for line in (shared_data / QASC).open()][:N_QASC]
    results = retriever.search([r["question"]["stem"] for r in rows], k=3)
    assert len(results) == N_QASC and all(len(ps) == 3 for ps in results)
    hits = sum(any(p.text in (r["fact1"], r["fact2"]) for p in ps) for r, ps in zip(rows, results))
    assert hits / N_QASC >= 0.8, f"gold fact in the top 3 for only {hits}/{N_QASC} questions"
    top = results[0][0]
    assert isinstance(top, Passage) and top.source == "qasc_facts:dev" and 0 < top.score <= 1.0001
    assert all(a.score >= b.score for ps in results for a, b in zip(ps, ps[1:]))
    assert set(top.to_dict()) == {"text", "source", "score", "doc_id"}
    assert retriever.search([], k=3) == []


def test_load_rejects_other_embedder_and_broken_files(built, tmp_path):
    with pytest.raises(IndexLoadError, match="built with embedder 'all-MiniLM-L6-v2', asked to query with 'thenlper/gte-small'"):
        Retriever.load(built, embedder="thenlper/gte-small")
    assert len(Retriever.load(built, embedder="sentence-transformers/all-MiniLM-L6-v2")) > 0  # an alias is fine

    def broken(name, damage):
        d = tmp_path / name
        shutil.copytree(built, d)
        damage(d)
        return d

    with pytest.raises(IndexLoadError, match="cannot be read as a FAISS index"):
        Retriever.load(broken("trunc", lambda d: (d / "index.faiss").write_bytes((d / "index.faiss").read_bytes()[:100])))
    with pytest.raises(IndexLoadError, match="mismatched files"):
        Retriever.load(broken("rows", lambda d: (d / "chunks.jsonl").write_text(
            "".join((d / "chunks.jsonl").read_text().splitlines(keepends=True)[:-1]))))
    with pytest.raises(IndexLoadError, match="corrupt manifest"):
        Retriever.load(broken("manifest", lambda d: (d / "manifest.json").write_text("{not json")))
    with pytest.raises(IndexLoadError, match="not an index directory"):
        Retriever.load(tmp_path / "nothing")


def test_chunking_windows_cover_the_document(minilm_tokenizer):
    text = " ".join(f"word{i}" for i in range(300))
    n_total = len(minilm_tokenizer(text, add_special_tokens=False)["input_ids"])
    pieces = chunk_document(Document(text, "s", "d"), minilm_tokenizer, 50, 10)
    assert all(n <= 50 for _, n in pieces) and all(t in text for t, _ in pieces)
    assert sum(n for _, n in pieces) - 10 * (len(pieces) - 1) == n_total  # windows + overlaps = the whole text
    assert pieces[0][0].startswith("word0 ") and pieces[-1][0].endswith("word299")
    assert chunk_document(Document("short text", "s", "d"), minilm_tokenizer, 50, 10) == [("short text", 2)]
    with pytest.raises(CorpusError, match="chunk_overlap"):
        chunk_document(Document(text, "s", "d"), minilm_tokenizer, 10, 10)


def test_corpus_bad_rows_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"id": 2}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: field 'text' is missing"):
        load_documents(CorpusSource(kind="jsonl", path=str(bad)), tmp_path)
    qasc = tmp_path / "q.jsonl"
    qasc.write_text('{"id": "a", "fact1": "Heat rises."}\n')
    with pytest.raises(CorpusError, match=r"q.jsonl:1: field 'fact2'"):
        load_documents(CorpusSource(kind="qasc_facts", path=str(qasc)), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_documents(CorpusSource(kind="openstax", path="missing.jsonl"), tmp_path)


def test_arc_para_and_mcq_text_sources(shared_data):
    paras = load_documents(CorpusSource(kind="arc_para", path="mcq/arc/ARC-Easy-dev.jsonl", limit=5), shared_data)
    assert paras and all(d.text and d.source == "arc_para:ARC-Easy-dev" for d in paras)
    mcq = load_documents(CorpusSource(kind="mcq_text", path="mcq/arc/ARC-Easy-dev.jsonl", format="arc_jsonl",
                                      limit=3), shared_data)
    assert len(mcq) == 3 and mcq[0].text.endswith("cellular telephone")  # question + its correct answer


def test_passages_within_budget(tiny_model):
    from stemqa.data.prompt import passages_block
    from stemqa.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    passages = [Passage(" ".join(f"fact{i}-{j}" for j in range(12)), "s", 1.0 - i / 10) for i in range(4)]
    size = lambda ps: len(tok(passages_block([p.text for p in ps]), add_special_tokens=False)["input_ids"])
    whole_two = size(passages[:2])
    fitted = passages_within_budget(passages, tok, whole_two + 20)
    assert fitted[:2] == passages[:2] and len(fitted) == 3 and fitted[2].text != passages[2].text  # 3rd cut
    assert passages[2].text.startswith(fitted[2].text[:10]) and size(fitted) <= whole_two + 20
    assert passages_within_budget(passages, tok, 10_000) == passages
    assert passages_within_budget(passages, tok, 12) == []  # less room than a useful piece of one passage


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_stored_vectors(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = make_faiss_index(vectors, kind, "cosine")
    if kind == "ivf":
        index.nprobe = 8
    _, ids = index.search(vectors[:100], 1)
    assert (ids[:, 0] == np.arange(100)).mean() >= 0.95


def test_rag_query_cli(built, capsys):
    from jobs.rag import main

    assert main(["query", "--index", str(built), "-k", "2", "What is climate described by?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["question"] == "What is climate described by?" and len(out[0]["passages"]) == 2


def test_rag_tune_embedder_cli_needs_out(capsys):
    from jobs.rag import main

    with pytest.raises(SystemExit) as exc:
        main(["tune-embedder", "--config", "demo"])
    assert exc.value.code == 2 and "rag tune-embedder needs --out DIR" in capsys.readouterr().err


def _mcq(i, subject):
    from stemqa.data.mcq import MCQ

    return MCQ(f"{subject}/{i}", subject, f"{subject} question {i}?", ["a", "b"], 0, "mmlu")


def test_triplets_pair_same_subject_against_another():
    from stemqa.rag.tune_embedder import make_triplets, split_by_subject

    records = [_mcq(i, s) for s in ("physics", "biology", "law") for i in range(10)]
    train, held = split_by_subject(records, 0.3, seed=1)
    assert len(held) == 9 and not {r.id for r in train} & {r.id for r in held}
    subject = {r.question: r.subject for r in records}
    triplets = make_triplets(train, 50, seed=2)
    assert len(triplets) == 50
    for a, p, n in triplets:
        assert a != p and subject[a] == subject[p] != subject[n]
    with pytest.raises(ValueError, match=">= 2 subjects"):
        make_triplets([_mcq(i, "physics") for i in range(5)], 3)


@pytest.mark.slow
def test_finetuned_embedder_ranks_same_subject_higher(ray_local, shared_data, tmp_path):
    """Ray Train fine-tuning on MMLU triplets raises same-subject precision@5 on held-out questions."""
    from stemqa.config.schema import McqSource
    from stemqa.data.mcq import load_source
    from stemqa.models import load_embedder
    from stemqa.rag.evaluate import same_subject_precision_at_k
    from stemqa.rag.tune_embedder import finetune_embedder, make_triplets, split_by_subject

    subjects = ["college_physics", "high_school_biology", "computer_security", "high_school_chemistry"]
    records, _ = load_source(McqSource(path="mcq/mmlu/test", format="mmlu_csv", subjects=subjects), shared_data)
    train, held = split_by_subject(records, 0.3)
    before = same_subject_precision_at_k(load_embedder("all-MiniLM-L6-v2"), held, train, 5)
    model_dir, metrics = finetune_embedder(make_triplets(train, 240), "all-MiniLM-L6-v2", tmp_path, steps=15,
                                           batch_size=16)
    assert (model_dir / "model.safetensors").exists() and metrics["loss_last"] < metrics["loss_first"]
    after = same_subject_precision_at_k(load_embedder(str(model_dir)), held, train, 5)
    assert after > before, (before, after)
