"""The fixed dev/report/train splits, MCQs as question -> answer text, and MCQ answer pairs for DPO."""
from __future__ import annotations

import json

import pytest

from stemqa.config import load_config
from stemqa.config.schema import DPOConfig, McqSource
from stemqa.data.mcq import MCQ, load_source, load_sources, write_records
from stemqa.data.paths import SAMPLE_DATA
from stemqa.data.preference import load_pairs, mcq_pair, prepare_pairs
from stemqa.data.qa import QAFormatError, load_qa_file, qa_from_mcq, qa_prompt
from stemqa.data.splits import (DEV_SETS, HELD_OUT, REPORT_SETS, key, load_held_out, part_of, select,
                                share)

from conftest import full_data


def present(root) -> list[str]:
    """The held-out sets whose files the data root has (all of them in ../shared/data; the sample has fewer)."""
    return [n for n, s in HELD_OUT.items() if (root / s.path).exists()]


def test_share_is_stable_and_ignores_case_and_punctuation():
    assert share("What is  the Sun?") == share("what is the sun") == share(" WHAT is the sun ?!")
    assert share("What is the Sun?") != share("What is the Moon?")
    assert 0 <= share("x") < 1
    # fixed in code: a change of salt or hash would move questions between train and report
    assert round(share("Which gas do plants absorb for photosynthesis?"), 6) == pytest.approx(0.765900, abs=1e-6)


def test_held_out_sets_on_real_data(shared_data):
    names = present(shared_data)
    sizes = {name: len(load_held_out(name, shared_data)) for name in names}
    if full_data(shared_data):
        assert names == list(HELD_OUT)
        assert sizes["arc_easy_dev"] == 570 and sizes["arc_challenge_dev"] == 299 and sizes["arc_easy_test"] == 2376
        assert 330 < sizes["arc_challenge_heldout"] < 420  # a third of 1,119, minus the one that is a dev question
        assert 330 < sizes["mmlu_stem_dev"] < 460 and 330 < sizes["mmlu_stem_report"] < 460
    else:  # the packaged sample's whole slices; MMLU's 4 subjects split by the hash
        assert (sizes["arc_easy_dev"], sizes["arc_challenge_dev"], sizes["arc_easy_test"]) == (25, 40, 40)
        assert 0 < sizes["arc_challenge_heldout"] < 60 and sizes["mmlu_stem_dev"] > 0 and sizes["mmlu_stem_report"] > 0
    dev = {key(q) for n in DEV_SETS if n in names for q in load_held_out(n, shared_data)}
    report = {key(q) for n in REPORT_SETS if n in names for q in load_held_out(n, shared_data)}
    assert dev and report and not dev & report


def test_training_side_is_decontaminated_across_files(shared_data):
    held = {key(q) for n in present(shared_data) for q in load_held_out(n, shared_data)}
    cfg = load_config("study")
    sources = [s for s in cfg.data.train if (shared_data / s.path).exists()]
    train, reports = load_sources(sources, shared_data)
    assert not {key(q) for q in train} & held
    by_path = {r.path.rsplit("/", 1)[-1]: r for r in reports}
    # ARC-Challenge train holds the report set arc_challenge_heldout: split: train leaves it out, and counts it
    assert by_path["ARC-Challenge-train.jsonl"].other_split > 0
    if not full_data(shared_data):
        return
    assert len(train) > 10_000 and len(sources) == len(cfg.data.train)
    # AI2 training files share questions with ARC-Easy test and ARC-Challenge: they are left out, and counted
    assert by_path["AI2-8thGr-NDMC-Feb2016-Train.jsonl"].other_split > 0
    assert "of another split left out" in by_path["AI2-8thGr-NDMC-Feb2016-Train.jsonl"].summary()
    # without the split the same files would leak held-out questions into training
    raw, _ = load_source(McqSource(path="mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl", format="arc_jsonl"),
                         shared_data)
    assert {key(q) for q in raw} & held


@pytest.mark.parametrize("preset", ["study", "qwen3-0.6b"])
def test_preset_eval_sets_are_the_fixed_sets(shared_data, preset):
    cfg = load_config(preset)
    checked = 0
    for s in cfg.eval.sets:
        if s.name not in present(shared_data):
            continue
        recs, _ = load_sources(s.sources, shared_data)
        fixed = load_held_out(s.name, shared_data)
        limit = s.sources[0].limit
        if limit is None:
            assert sorted(key(q) for q in recs) == sorted(key(q) for q in fixed), s.name
        else:  # a slice of the fixed set, never a question from outside it
            assert {key(q) for q in recs} <= {key(q) for q in fixed} and len(recs) == min(limit, len(fixed)), s.name
        part = s.sources[0].split
        assert part == HELD_OUT[s.name].part
        checked += 1
    assert checked == (len(cfg.eval.sets) if full_data(shared_data) else 3)


def test_split_applies_before_limit_and_rejects_unknown_parts(tmp_path):
    recs = [MCQ(f"q{i}", "s", f"question {i}", ["a", "b"], 0, "x") for i in range(20)]
    write_records(recs, tmp_path / "r.jsonl")
    kept, other = select(recs, "train", tmp_path)  # no held-out files under this root: all train
    assert len(kept) == 20 and other == 0
    assert part_of(recs[0], tmp_path) == "train"
    got, reps = load_source(McqSource(path=str(tmp_path / "r.jsonl"), format="records_jsonl", split="dev", limit=3),
                            tmp_path)
    assert got == [] and reps[0].other_split == 20
    with pytest.raises(ValueError, match="split 'test'"):
        select(recs, "test", tmp_path)


def test_mcq_records_train_as_question_to_answer_text(tmp_path):
    recs = [MCQ("a", "science", "Which gas do plants absorb?", ["oxygen", "carbon dioxide"], 1, "arc")]
    write_records(recs, tmp_path / "r.jsonl")
    qa = load_qa_file(tmp_path / "r.jsonl")
    assert qa[0].answer == "carbon dioxide" and qa[0].id == "a"
    assert qa_prompt(qa[0]) == "Question: Which gas do plants absorb?\nAnswer:"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}) + "\n")
    with pytest.raises(QAFormatError, match=r"bad.jsonl:1: an MCQ record, but answer 2"):
        load_qa_file(tmp_path / "bad.jsonl")


def test_mcq_pairs_same_format_both_sides():
    q = MCQ("x1", "science", "Which gas do plants absorb?", ["oxygen", "carbon dioxide", "nitrogen"], 1, "arc")
    p = mcq_pair(q, "mcq:test")
    assert p.prompt == "Question: Which gas do plants absorb?\nAnswer:"
    assert p.chosen == " carbon dioxide" and p.rejected in (" oxygen", " nitrogen")
    assert mcq_pair(q, "mcq:test") == p  # deterministic
    same = MCQ("x2", "s", "q", ["yes", "yes "], 0, "s")
    with pytest.raises(ValueError, match="no wrong option differs"):
        mcq_pair(same, "mcq:test")


def test_prepare_pairs_from_mcq_sets_and_hard_aqua(tiny_model, tmp_path):
    from stemqa.models.loader import load_tokenizer

    cfg = DPOConfig(split=(0.8, 0.1, 0.1), max_len=512)
    sources = ["mcq:arc_jsonl:mcq/arc/ARC-Easy-train.jsonl", "mcq:arc_jsonl:mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl",
               "aqua_hard:mcq/aqua_rat/dev.json"]
    res = prepare_pairs(sources, SAMPLE_DATA, load_tokenizer(tiny_model), cfg, tmp_path / "pairs")
    counts = res["counts"]["sources"]
    arc = counts["mcq:arc_jsonl:mcq/arc/ARC-Easy-train.jsonl"]
    assert arc["loaded"] > 0 and arc["stem_dropped"] == 0  # the keyword filter does not apply to MCQ pairs
    hard, _ = load_pairs("aqua_hard", SAMPLE_DATA / "mcq/aqua_rat/dev.json")
    easy, _ = load_pairs("aqua", SAMPLE_DATA / "mcq/aqua_rat/dev.json")
    for h, e in zip(hard, easy):
        assert h.prompt == e.prompt and h.chosen == e.chosen
        # the same rationale, ending in a wrong option
        assert h.rejected.rsplit("\n", 1)[0] == h.chosen.rsplit("\n", 1)[0]
        assert h.rejected.rsplit("\n", 1)[1] == e.rejected.strip() != h.chosen.rsplit("\n", 1)[1]
    with pytest.raises(ValueError, match="mcq:<format>:<path>"):
        prepare_pairs(["mcq:mcq/arc/ARC-Easy-train.jsonl"], SAMPLE_DATA, load_tokenizer(tiny_model), cfg, tmp_path / "x")
    with pytest.raises(ValueError, match="kinds: "):
        prepare_pairs(["mcqs:arc_jsonl:x"], SAMPLE_DATA, load_tokenizer(tiny_model), cfg, tmp_path / "y")


def test_mcq_pairs_skip_held_out_and_repeated_questions(shared_data, tmp_path):
    from stemqa.data.preference import load_mcq_pairs

    seen: set = set()
    arc, rep = load_mcq_pairs("arc_jsonl:mcq/arc/ARC-Challenge-train.jsonl", shared_data, "mcq:a", seen=seen)
    assert rep["held_out"] > (300 if full_data(shared_data) else 0) and rep["loaded"] == len(arc)
    ai2, rep2 = load_mcq_pairs("arc_jsonl:mcq/ai2_science/AI2-8thGr-NDMC-Feb2016-Train.jsonl", shared_data, "mcq:b",
                               seen=seen)
    if full_data(shared_data):  # (the sample's slices of the two files do not overlap)
        assert rep2["duplicate_questions"] > 0  # AI2 questions already paired from ARC-Challenge train
    train, _ = load_source(McqSource(path="mcq/arc/ARC-Challenge-train.jsonl", format="arc_jsonl", split="train"),
                           shared_data)
    assert [p.prompt for p in arc] == [qa_prompt(qa_from_mcq(q)) for q in train]  # the training side, nothing else
    with pytest.raises(ValueError, match="format .bogus_format. is not one of"):
        load_mcq_pairs("bogus_format:mcq/arc/ARC-Challenge-train.jsonl", shared_data, "mcq:c")
