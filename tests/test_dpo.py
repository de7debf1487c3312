"""DPO: batch layout, reference log-probs from the Ray Data job vs a direct forward, and a real run's metrics."""
import json

import pytest
import torch

from stemqa.config import load_config
from stemqa.data.preference import Pair, prepare_pairs, read_pairs
from stemqa.models.loader import load_causal_lm, load_tokenizer
from stemqa.train.dpo import collate_pairs, encode_pair, reference_logps, run_dpo, sequence_logps

PAIRS = [Pair("a", "Question: 2 + 3 = ?\nAnswer:", " 2 + 3 = 5. The answer is 5", " The answer is 7", "t"),
         Pair("b", "Question: What is the speed of light in vacuum, roughly?\nAnswer:", " 3e8 m/s", " 10 m/s", "t")]


def test_sequence_logps_equal_unpadded_forward(tiny_model):
    """Aligned, padded pair batches give each completion's log-prob as an unpadded forward does."""
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, device="cpu")
    samples = [encode_pair(tok, p, 256) for p in PAIRS]
    with torch.no_grad():
        chosen, rejected, c_len, r_len = sequence_logps(model, collate_pairs(samples, tok.pad_token_id))
        for i, s in enumerate(samples):
            for comp, got in ((s["chosen"], chosen[i]), (s["rejected"], rejected[i])):
                ids = torch.tensor([s["prompt"] + comp])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                want = logp[torch.arange(len(s["prompt"]) - 1, ids.shape[1] - 1), ids[0, len(s["prompt"]):]].sum()
                assert abs(float(got) - float(want)) < 1e-3
    assert c_len.tolist() == [len(s["chosen"]) for s in samples]
    assert tok.decode(samples[1]["rejected"]) == " 10 m/s" + tok.eos_token


def test_encode_pair_rejects_prompt_over_max_len(tiny_model):
    tok = load_tokenizer(tiny_model)
    with pytest.raises(ValueError, match="pair b: prompt of .* no room under max_len 8"):
        encode_pair(tok, PAIRS[1], 8)


@pytest.mark.slow
def test_dpo_run_gives_metrics_and_model(ray_local, shared_data, tiny_model, tmp_path):
    cfg = load_config("demo", ["model.name=tiny-qwen3", "dpo.lr=1e-3", "dpo.max_steps=4", "dpo.eval_every=2",
                               "dpo.checkpoint_every=2", "dpo.split_sizes=[40,12,12]", "dpo.max_len=256",
                               "dpo.resources.zero_stage=2"])
    prep = prepare_pairs(["aqua:mcq/aqua_rat/dev.json"], shared_data, load_tokenizer(tiny_model), cfg.dpo,
                         tmp_path / "pairs")
    assert prep["counts"]["split_by"] == "sizes"
    result = run_dpo(cfg, tmp_path / "pairs", tmp_path / "out", "tiny-qwen3")
    m = result["metrics"]
    assert m["steps"] == 4 and [e["step"] for e in m["evals"]] == [0, 2, 4]
    assert m["val_reward_accuracy_before"] <= 0.1  # policy == reference at the start: no reward yet
    assert m["val_reward_accuracy_best"] >= 0.75 and m["test_reward_accuracy"] >= 0.75, m
    assert m["evals"][-1]["loss"] < m["evals"][0]["loss"]
    assert m["ref_logps_computed"] is True
    # stored beside the pairs, one score per pair, and reused by a second call
    ref_dir = tmp_path / "pairs/ref_logps"
    stored = [json.loads(line) for f in ref_dir.glob("*/train.jsonl") for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in stored) == sorted(p.id for p in read_pairs(tmp_path / "pairs/train.jsonl"))
    pairs = {s: read_pairs(tmp_path / f"pairs/{s}.jsonl") for s in ("train", "val", "test")}
    again = reference_logps(tmp_path / "pairs", tiny_model, pairs, cfg.dpo)
    assert again["computed"] is False
    assert load_causal_lm(result["model_dir"], device="cpu") is not None
