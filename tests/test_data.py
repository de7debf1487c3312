"""MCQ loaders: every layout, answer keys that are letters, numbers or indices, and bad rows named by file:line."""
import gzip
import json

import pytest

from stemqa.config.schema import McqSource
from stemqa.data.mcq import MCQ, MCQFormatError, load_file, load_source, read_records, write_records
from stemqa.data.paths import SAMPLE_DATA
from stemqa.data.prompt import harness_prompt, target


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_mmlu_csv(tmp_path):
    p = write(tmp_path, "college_physics_test.csv", '"What, is 1+1?",1,2,3,4,B\nq2,a,b,c,d,D\n')
    recs, rep = load_file(p, "mmlu_csv")
    assert [r.answer for r in recs] == [1, 3] and rep.loaded == 2
    assert recs[0].subject == "college_physics" and recs[0].question == "What, is 1+1?"
    assert recs[0].choices == ["1", "2", "3", "4"]


def test_hf_jsonl_answer_index_or_letter(tmp_path):
    p = write(tmp_path, "x.jsonl", json.dumps({"question": "q", "choices": ["a", "b", "c"], "answer": 2}) + "\n"
              + json.dumps({"question": "q", "choices": ["a", "b"], "answer": "B", "subject": "chem"}) + "\n")
    recs, _ = load_file(p, "hf_jsonl")
    assert [r.answer for r in recs] == [2, 1] and recs[1].subject == "chem"


def test_arc_layout_with_numeric_labels_and_eight_choices(tmp_path):
    rows = [
        {"id": "a", "question": {"stem": "s", "choices": [{"label": str(i), "text": f"t{i}"} for i in range(1, 5)]}, "answerKey": "3"},
        {"id": "b", "question": {"stem": "s", "choices": [{"label": c, "text": c} for c in "ABCDEFGH"]}, "answerKey": "H"},
    ]
    p = write(tmp_path, "arc.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    recs, _ = load_file(p, "arc_jsonl")
    assert recs[0].answer == 2 and recs[0].answer_letter == "C"
    assert len(recs[1].choices) == 8 and recs[1].answer_letter == "H"


def test_aqua(tmp_path):
    row = {"question": "2+2?", "options": ["A)3", "B)4", "C)5", "D)6", "E)7"], "rationale": "r", "correct": "B"}
    recs, _ = load_file(write(tmp_path, "dev.json", json.dumps(row) + "\n"), "aqua_jsonl")
    assert recs[0].choices == ["3", "4", "5", "6", "7"] and recs[0].answer == 1


def test_records_round_trip(tmp_path):
    recs = [MCQ("1", "physics", "q?", ["a", "b"], 1, "src")]
    write_records(recs, tmp_path / "r.jsonl")
    assert read_records(tmp_path / "r.jsonl") == recs


@pytest.mark.parametrize("fmt, text, reason", [
    ("mmlu_csv", "ok,a,b,c,d,A\nq,a,b,c,d,E\n", "answer 'E' has no option"),
    ("mmlu_csv", "ok,a,b,c,d,A\nq,a\n", "column"),
    ("hf_jsonl", '{"question":"q","choices":["a","b"],"answer":0}\n{"question":"q","answer":0}\n', "missing field 'choices'"),
    ("hf_jsonl", '{"question":"q","choices":["a","b"],"answer":0}\n{"question":"q","choices":[],"answer":0}\n', "at least 2 choices"),
    ("hf_jsonl", '{"question":"q","choices":["a","b"],"answer":0}\n{"question":"q","choices":["a","b"],"answer":5}\n', "has no option"),
    ("hf_jsonl", '{"question":"q","choices":["a","b"],"answer":0}\n{not json\n', "not valid JSON"),
    ("arc_jsonl", '{"question":{"stem":"s","choices":[{"label":"A","text":"a"},{"label":"B","text":"b"}]},"answerKey":"A"}\n'
                  '{"question":{"stem":"s","choices":[{"label":"A","text":"a"},{"label":"B","text":"b"}]},"answerKey":"C"}\n', "answerKey 'C' has no option"),
    ("arc_jsonl", '{"question":{"stem":"s","choices":[{"label":"A","text":"a"},{"label":"B","text":"b"}]},"answerKey":"A"}\n'
                  '{"question":{"choices":[]},"answerKey":"A"}\n', "missing field 'question.stem'"),
    ("aqua_jsonl", '{"question":"q","options":["A)1","B)2"],"correct":"A"}\n{"question":"q","options":["A)1","B)2"]}\n', "missing field 'correct'"),
    ("records_jsonl", '{"id":"1","subject":"s","question":"q","choices":["a","b"],"answer":0,"source":"x"}\n{"id":"2"}\n', "missing field"),
    ("hf_jsonl", '{"question":"q","choices":["a","b"],"answer":0}\n{"question":"  ","choices":["a","b"],"answer":0}\n', "empty question"),
])
def test_bad_rows_name_file_and_line(tmp_path, fmt, text, reason):
    p = write(tmp_path, "bad.data", text)
    with pytest.raises(MCQFormatError) as e:
        load_file(p, fmt)
    assert str(e.value).startswith(f"{p}:2: ") and reason in str(e.value)
    recs, rep = load_file(p, fmt, skip_invalid=True)
    assert len(recs) == 1 and rep.skipped == 1 and rep.reasons[0].startswith(f"{p}:2:")


def test_real_data_loads_whole(shared_data):
    for path, fmt in [("mcq/arc/ARC-Easy-test.jsonl", "arc_jsonl"), ("mcq/qasc/dev.jsonl", "arc_jsonl"),
                      ("mcq/aqua_rat/dev.json", "aqua_jsonl"), ("mcq/ai2_science/AI2-Elementary-NDMC-Feb2016-Dev.jsonl", "arc_jsonl")]:
        recs, rep = load_file(shared_data / path, fmt)
        with open(shared_data / path) as f:
            assert rep.loaded == sum(1 for line in f if line.strip()), path
    recs, reps = load_source(McqSource(path="mcq/mmlu/test", format="mmlu_csv"), shared_data)
    from conftest import full_data

    if full_data(shared_data):
        assert len(recs) == 7032 and len({r.subject for r in recs}) == 57
    else:  # the packaged sample: every row of its 4 subjects
        assert len(recs) == sum(r.loaded for r in reps) == 80 and len({r.subject for r in recs}) == 4


def test_packaged_sample_has_every_demo_source():
    from stemqa.config import load_config
    from stemqa.data.mcq import load_sources

    cfg = load_config("demo")
    sets = [cfg.data.train] + [t.sources for t in cfg.filter.targets] + [s.sources for s in cfg.eval.sets]
    for sources in sets:
        recs, _ = load_sources(sources, SAMPLE_DATA)
        assert recs, sources
    for src in cfg.rag.corpus:
        assert (SAMPLE_DATA / src.path).is_file()


def test_harness_prompt_matches_lm_eval_mmlu():
    q = MCQ("1", "college_physics", " What is c? ", ["3e8 m/s", "1 m/s"], 0, "x")
    shot = MCQ("2", "college_physics", "Unit of force?", ["newton", "joule"], 0, "x")
    p = harness_prompt(q, fewshot=[shot])
    assert p == ("The following are multiple choice questions (with answers) about college physics.\n\n"
                 "Unit of force?\nA. newton\nB. joule\nAnswer: A\n\n"
                 "What is c?\nA. 3e8 m/s\nB. 1 m/s\nAnswer:")
    assert target(q) == " A"
    assert harness_prompt(q, header=False, passages=["c is the speed of light."]).startswith("Context:\n- c is")
