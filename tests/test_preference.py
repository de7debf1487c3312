"""Preference loaders, the STEM filter, the length cap and the deterministic split, on real files and bad input."""
import gzip
import json

import pytest

from stemqa.config.schema import DPOConfig
from stemqa.data.preference import (PreferenceFormatError, aqua_pairs, is_stem, load_pairs, prepare_pairs,
                                    read_pairs, split_sizes)
from stemqa.models.loader import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(tiny_model)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_aqua_pairs_from_real_data(shared_data):
    from conftest import full_data

    pairs = aqua_pairs(shared_data / "mcq/aqua_rat/dev.json")
    assert len(pairs) == (254 if full_data(shared_data) else 96)  # else the packaged sample's first 96 rows
    first = pairs[0]  # "Three birds ... 900 km/h", correct A)32400
    assert first.prompt.startswith("Question: Three birds") and first.prompt.endswith("Answer:")
    assert "A)32400" in first.prompt and "E)10" in first.prompt
    assert first.chosen.rstrip().endswith("The answer is A)32400") and "0.6" in first.chosen
    assert first.rejected.startswith(" The answer is ") and "A)32400" not in first.rejected
    assert aqua_pairs(shared_data / "mcq/aqua_rat/dev.json")[5].rejected == pairs[5].rejected  # deterministic


def test_sharegpt_and_hh_real_files(shared_data):
    from conftest import full_data

    full = full_data(shared_data)  # else the packaged sample: the first 20 and 100 rows of the same files
    share, rep = load_pairs("sharegpt", shared_data / "preference/dpo_en_demo.json")
    assert rep["loaded"] == (300 if full else 20) and share[0].prompt.startswith("\n\nHuman: Hi! I'd like")
    assert share[0].prompt.endswith("\n\nAssistant:") and share[0].chosen.startswith(" That sounds")
    hh_path = shared_data / "preference/hh_rlhf_harmless_base_test.jsonl.gz"
    with pytest.raises(PreferenceFormatError, match=r"hh_rlhf_harmless_base_test.jsonl.gz:87: field 'chosen'"):
        load_pairs("hh", hh_path)  # a real row whose chosen reply is empty
    hh, rep = load_pairs("hh", hh_path, skip_invalid=True)
    assert (rep["skipped"], rep["loaded"]) == ((4, 2308) if full else (1, 99))
    assert rep["reasons"][0].endswith("must be a non-empty string")
    p = hh[0]
    assert p.prompt.endswith("\n\nAssistant:") and p.chosen != p.rejected
    raw = json.loads(gzip.open(hh_path, "rt").readline())
    assert p.prompt + p.chosen == raw["chosen"] and p.prompt + p.rejected == raw["rejected"]


@pytest.mark.parametrize("row,message", [
    ("{not json", "not valid JSON"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a non-empty string"),
])
def test_pairs_jsonl_bad_rows_name_file_and_line(tmp_path, row, message):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(PreferenceFormatError, match=rf"p.jsonl:2: .*{message}"):
        load_pairs("pairs", path)
    pairs, rep = load_pairs("pairs", path, skip_invalid=True)
    assert len(pairs) == 1 and rep["skipped"] == 1


def test_other_bad_inputs(tmp_path):
    bad_aqua = _jsonl(tmp_path / "a.json", [{"question": "q", "options": ["A)1", "C)2"], "rationale": "r",
                                              "correct": "A"}])
    with pytest.raises(PreferenceFormatError, match=r"a.json:1: option 1 'C\)2'"):
        aqua_pairs(bad_aqua)
    (tmp_path / "s.json").write_text(json.dumps({"conversations": []}))
    with pytest.raises(PreferenceFormatError, match="expected a JSON array"):
        load_pairs("sharegpt", tmp_path / "s.json")
    bad_turn = [{"conversations": [{"from": "human"}], "chosen": {}, "rejected": {}}]
    (tmp_path / "s2.json").write_text(json.dumps(bad_turn))
    with pytest.raises(PreferenceFormatError, match=r"s2.json:\[0\]: missing field 'value'"):
        load_pairs("sharegpt", tmp_path / "s2.json")
    with pytest.raises(ValueError, match="unknown preference source kind 'csv'"):
        load_pairs("csv", bad_aqua)
    with pytest.raises(FileNotFoundError, match="no such preference file"):
        load_pairs("pairs", tmp_path / "missing.jsonl")


def test_stem_filter():
    from stemqa.data.preference import Pair

    assert is_stem(Pair("1", "What is the velocity of the ball?", "3 m/s", "no", "t"))
    assert is_stem(Pair("2", "Q: A man has 12 apples", " 12 * 3 = 36", "no", "t"))
    assert not is_stem(Pair("3", "Write me a poem about love", "Roses are red", "no", "t"))


def test_split_sizes():
    assert split_sizes(100, (0.8, 0.1, 0.1)) == ((80, 10, 10), "fractions")
    assert split_sizes(30000, (0.8, 0.1, 0.1), (24000, 3000, 3000)) == ((24000, 3000, 3000), "sizes")
    assert split_sizes(200, (0.8, 0.1, 0.1), (24000, 3000, 3000)) == ((160, 20, 20), "fractions")


def test_prepare_pairs_counts_split_and_determinism(shared_data, tok, tmp_path):
    cfg = DPOConfig(max_len=200, split=(0.6, 0.2, 0.2))
    sources = ["aqua:mcq/aqua_rat/dev.json", "sharegpt:preference/dpo_en_demo.json"]
    from conftest import full_data

    n_aqua, n_share = (254, 300) if full_data(shared_data) else (96, 20)  # else the packaged sample's slices
    a = prepare_pairs(sources, shared_data, tok, cfg, tmp_path / "a")
    c = a["counts"]
    assert c["sources"]["aqua:mcq/aqua_rat/dev.json"]["loaded"] == n_aqua
    share = c["sources"]["sharegpt:preference/dpo_en_demo.json"]
    assert 0 < share["stem_dropped"] < n_share and share["stem_kept"] + share["stem_dropped"] == n_share
    assert c["too_long_dropped"] > 0 and c["kept"] == c["total"] - c["too_long_dropped"]
    assert c["train"] + c["val"] + c["test"] == c["kept"] and c["split_by"] == "fractions"
    splits = {s: read_pairs(a[s]) for s in ("train", "val", "test")}
    ids = [p.id for s in splits.values() for p in s]
    assert len(ids) == len(set(ids)) == c["kept"]
    b = prepare_pairs(sources, shared_data, tok, cfg, tmp_path / "b")
    assert (tmp_path / "a/test.jsonl").read_text() == (tmp_path / "b/test.jsonl").read_text()
    assert json.loads((tmp_path / "a/prep.json").read_text()) == b["counts"]
    no_filter = prepare_pairs(sources, shared_data, tok, cfg.model_copy(update={"stem_filter": False}), tmp_path / "n")
    assert no_filter["counts"]["total"] == n_aqua + n_share
