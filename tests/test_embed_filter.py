"""Ray Data embedding and the similarity filter, on the real all-MiniLM-L6-v2 and real MCQ data."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stemqa.config.schema import EmbedConfig, FilterConfig, McqSource
from stemqa.data.mcq import MCQ, load_source, read_records
from stemqa.embed import embed_texts, load_embeddings, save_embeddings
from stemqa.filter import FilterError, keep_mask, max_similarity, mcq_text, run_filter

SMALL = EmbedConfig(batch_size=7, num_actors=1, cpus_per_actor=0.5)  # 7: batches that do not divide the input


@pytest.fixture(scope="module")
def minilm():
    from stemqa.models import load_embedder

    return load_embedder("all-MiniLM-L6-v2")


def _reference(model, texts):
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)


def test_embed_texts_keeps_order_and_normalises(ray_local, minilm):
    # Lengths vary a lot, so a reordering of batches would put a visibly different vector in a row.
    texts = [("Newton's law " * (i % 9 + 1)) + f"item {i}: {['gas', 'cell', 'orbit', 'acid'][i % 4]}"
             for i in range(40)]
    vectors = embed_texts(texts, SMALL)
    assert vectors.shape == (40, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    reference = _reference(minilm, texts)
    np.testing.assert_allclose(vectors, reference, atol=1e-4)
    assert (np.argmax(vectors @ reference.T, axis=1) == np.arange(40)).all()


@pytest.mark.parametrize("bad, message", [
    ([], "no texts"), ("one string", "list of texts"), (["ok", None], "text 1 is NoneType"), (["ok", "  "], "text 1 is empty"),
])
def test_embed_texts_rejects_bad_input(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        embed_texts(bad, SMALL)


def test_embeddings_round_trip(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    save_embeddings(tmp_path, ["a", "b", "c"], vectors, "all-MiniLM-L6-v2")
    ids, loaded, name = load_embeddings(tmp_path)
    assert ids == ["a", "b", "c"] and name == "all-MiniLM-L6-v2"
    np.testing.assert_array_equal(loaded, vectors)
    with pytest.raises(ValueError, match="2 ids for 3 vectors"):
        save_embeddings(tmp_path, ["a", "b"], vectors, "x")


def _load(shared_data, path, fmt, name, limit, subjects=None):
    return load_source(McqSource(path=path, format=fmt, name=name, subject="science" if fmt == "arc_jsonl" else None,
                                 limit=limit, subjects=subjects), shared_data)[0]


def test_filter_scores_equal_brute_force_max_cosine(ray_local, minilm, shared_data, tmp_path):
    pool = (_load(shared_data, "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", "arc_easy", 14)
            + _load(shared_data, "mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl", "arc_jsonl", "ai2_8th", 8))
    targets = {
        "mmlu": _load(shared_data, "mcq/mmlu/dev", "mmlu_csv", "mmlu_dev", 10,
                      subjects=["college_physics", "high_school_biology"]),
        "science": _load(shared_data, "mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Dev.jsonl", "arc_jsonl", "ai2_dev", 10),
    }
    leak = targets["mmlu"][3]  # a copy of a target question must score ~1 against that target and be kept
    pool.append(MCQ("leak/1", leak.subject, leak.question, list(leak.choices), leak.answer, "leak"))

    # Brute force, in process, no FAISS: max over the target of the dot products of normalised vectors.
    sample_vecs = _reference(minilm, [mcq_text(r) for r in pool])
    expected = {name: (sample_vecs @ _reference(minilm, [mcq_text(q) for q in qs]).T).max(axis=1)
                for name, qs in targets.items()}
    expected_mean = (expected["mmlu"] + expected["science"]) / 2
    ranked = np.sort(expected_mean)  # a threshold between two samples: both kept and dropped ones, no ties
    threshold = float(ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2

    cfg = FilterConfig(targets=[], threshold=threshold, embed=SMALL)
    result = run_filter(pool, targets, cfg, tmp_path)

    rows = [json.loads(line) for line in open(result["scores_path"])]
    assert [r["id"] for r in rows] == [r.id for r in pool]
    for name in targets:
        np.testing.assert_allclose([r["scores"][name] for r in rows], expected[name], atol=1e-4)
    np.testing.assert_allclose([r["mean"] for r in rows], expected_mean, atol=1e-4)
    assert rows[-1]["scores"]["mmlu"] > 0.999 and rows[-1]["kept"]

    kept_flags = [r["kept"] for r in rows]
    assert kept_flags == [bool(m >= threshold) for m in expected_mean]
    assert 0 < result["kept"] < result["total"] == len(pool)
    kept_records = read_records(result["kept_path"])
    assert [r.id for r in kept_records] == [r["id"] for r in rows if r["kept"]]
    for source in ("arc_easy", "ai2_8th", "leak"):
        flags = [r["kept"] for r in rows if r["source"] == source]
        assert result["counts"][source] == {"kept": sum(flags), "dropped": len(flags) - sum(flags)}
    with open(result["histogram"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ids, vectors, embedder = load_embeddings(result["embeddings"])  # every embedded text, with its id
    assert embedder == "all-MiniLM-L6-v2" and len(ids) == len(vectors) == len(pool) + 20
    assert ids[0] == f"sample:{pool[0].id}" and ids[len(pool)] == f"mmlu:{targets['mmlu'][0].id}"
    np.testing.assert_allclose(vectors[: len(pool)], sample_vecs, atol=1e-4)


def test_filter_that_keeps_nothing_fails_clearly(ray_local, tmp_path):
    pool = [MCQ(f"p{i}", "physics", f"What is the unit of {w}?", ["joule", "newton"], 0, "pool")
            for i, w in enumerate(["force", "energy"])]
    targets = {"cooking": [MCQ("t0", "food", "How long do you boil an egg?", ["5 min", "1 h"], 0, "t")]}
    with pytest.raises(FilterError, match=r"kept none of 2 samples: threshold 0.99 is above the best mean score"):
        run_filter(pool, targets, FilterConfig(threshold=0.99, embed=SMALL), tmp_path)
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 2  # written, to show why
    assert not (tmp_path / "kept.jsonl").exists()


def test_keep_mask_threshold_and_top_n():
    scores = np.array([0.2, 0.9, 0.5, 0.9, 0.1])
    assert keep_mask(scores, 0.5, None).tolist() == [False, True, True, True, False]
    assert keep_mask(scores, 0.5, 2).tolist() == [False, True, False, True, False]  # top_n wins over threshold
    assert keep_mask(scores, None, 10).all()
    with pytest.raises(FilterError, match="threshold or filter.top_n"):
        keep_mask(scores, None, None)


def test_max_similarity_flat_and_hnsw_agree():
    rng = np.random.default_rng(1)
    target = rng.standard_normal((500, 32)).astype(np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    samples = target[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    exact = (samples @ target.T).max(axis=1)
    np.testing.assert_allclose(max_similarity(samples, target, "flat"), exact, atol=1e-5)
    np.testing.assert_allclose(max_similarity(samples, target, "hnsw"), exact, atol=1e-5)


def _q(i, source="s"):
    return MCQ(f"q{i}", "physics", f"question {i}?", ["a", "b"], 0, source)


@pytest.mark.parametrize("records, targets, cfg, message", [
    ([], {"t": [_q(0)]}, FilterConfig(), "no training samples"),
    ([_q(1)], {}, FilterConfig(), "no target sets"),
    ([_q(1)], {"t": []}, FilterConfig(), "target set 't' has no samples"),
    ([_q(1)], {"t": [_q(0)]}, FilterConfig(threshold=None), "threshold or filter.top_n"),
])
def test_filter_rejects_bad_input_before_embedding(records, targets, cfg, message, tmp_path):
    with pytest.raises(FilterError, match=message):
        run_filter(records, targets, cfg, tmp_path)


def test_disabled_filter_keeps_everything(tmp_path):
    pool = [_q(0, "a"), _q(1, "a"), _q(2, "b")]
    result = run_filter(pool, {}, FilterConfig(enabled=False), tmp_path)
    assert result["kept"] == result["total"] == 3 and result["histogram"] is None
    assert result["counts"] == {"a": {"kept": 2, "dropped": 0}, "b": {"kept": 1, "dropped": 0}}
    assert [r.id for r in read_records(result["kept_path"])] == ["q0", "q1", "q2"]
