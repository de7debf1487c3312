"""DPO: batch layout, reference log-probs from the Ray Data job vs a direct forward, and a real run's metrics."""
import json

import pytest
import torch

from stemqa.config import load_config
from stemqa.data.preference import Pair, prepare_pairs, read_pairs
from stemqa.models import packed_attention
from stemqa.models.loader import load_causal_lm, load_tokenizer
from stemqa.train.dpo import collate_pairs, encode_pair, reference_logps, run_dpo, sequence_logps
from stemqa.train.loop import TrainHooks, TrainOptions

PAIRS = [Pair("a", "Question: 2 + 3 = ?\nAnswer:", " 2 + 3 = 5. The answer is 5", " The answer is 7", "t"),
         Pair("b", "Question: What is the speed of light in vacuum, roughly?\nAnswer:", " 3e8 m/s", " 10 m/s", "t")]


@pytest.mark.parametrize("packing", [False, True])
def test_sequence_logps_equal_unpadded_forward(tiny_model, packing):
    """Aligned, padded pair batches, and all pairs' sequences packed in one padding-free row (`dpo.packing`, with
    stemqa's packed attention), give each completion's log-prob as an unpadded forward does."""
    tok = load_tokenizer(tiny_model)
    attn = {"attn_implementation": packed_attention.register()} if packing else {}
    model = load_causal_lm(tiny_model, device="cpu", **attn)
    samples = [encode_pair(tok, p, 256) for p in PAIRS]
    with torch.no_grad():
        chosen, rejected, c_len, r_len = sequence_logps(model, collate_pairs(samples, tok.pad_token_id, packing))
        for i, s in enumerate(samples):
            for comp, got in ((s["chosen"], chosen[i]), (s["rejected"], rejected[i])):
                ids = torch.tensor([s["prompt"] + comp])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                want = logp[torch.arange(len(s["prompt"]) - 1, ids.shape[1] - 1), ids[0, len(s["prompt"]):]].sum()
                assert abs(float(got) - float(want)) < 1e-3
    assert c_len.tolist() == [len(s["chosen"]) for s in samples]
    assert r_len.tolist() == [len(s["rejected"]) for s in samples]
    assert tok.decode(samples[1]["rejected"]) == " 10 m/s" + tok.eos_token


def test_encode_pair_rejects_prompt_over_max_len(tiny_model):
    tok = load_tokenizer(tiny_model)
    with pytest.raises(ValueError, match="pair b: prompt of .* no room under max_len 8"):
        encode_pair(tok, PAIRS[1], 8)


@pytest.mark.slow
def test_dpo_run_gives_metrics_and_model(ray_local, shared_data, tiny_model, tmp_path):
    cfg = load_config("demo", ["model.name=tiny-qwen3", "dpo.lr=1e-3", "dpo.max_steps=4", "dpo.eval_every=2",
                               "dpo.checkpoint_every=2", "dpo.split_sizes=[40,12,12]", "dpo.max_len=256",
                               "dpo.resources.zero_stage=2", "dpo.packing=true"])
    prep = prepare_pairs(["aqua:mcq/aqua_rat/dev.json"], shared_data, load_tokenizer(tiny_model), cfg.dpo,
                         tmp_path / "pairs")
    assert prep["counts"]["split_by"] == "sizes"
    result = run_dpo(cfg, tmp_path / "pairs", tmp_path / "out", "tiny-qwen3")
    m, evals = result.metrics, result.history.eval_dicts()
    assert m["steps"] == 4 and [e["step"] for e in evals] == [0, 2, 4]
    assert m["val_reward_accuracy_before"] <= 0.1  # policy == reference at the start: no reward yet
    assert m["val_reward_accuracy_best"] >= 0.75 and m["test_reward_accuracy"] >= 0.75, m
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert m["ref_logps_computed"] is True
    # stored beside the pairs, one score per pair, and reused by a second call
    ref_dir = tmp_path / "pairs/ref_logps"
    stored = [json.loads(line) for f in ref_dir.glob("*/train.jsonl") for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in stored) == sorted(p.id for p in read_pairs(tmp_path / "pairs/train.jsonl"))
    pairs = {s: read_pairs(tmp_path / f"pairs/{s}.jsonl") for s in ("train", "val", "test")}
    again = reference_logps(tmp_path / "pairs", tiny_model, pairs, cfg.dpo)
    assert again["computed"] is False
    assert load_causal_lm(result.model_dir, device="cpu") is not None


DPO_RESUME = ["model.name=tiny-qwen3", "dpo.lr=1e-3", "dpo.max_steps=5", "dpo.eval_every=2", "dpo.patience=10",
              "dpo.checkpoint_every=2", "dpo.grad_accum=2", "dpo.split_sizes=[16,8,0]", "dpo.max_len=192"]


@pytest.fixture(scope="module")
def dpo_clean(ray_local, shared_data, tiny_model, tmp_path_factory):
    """Pairs (reference log-probs computed once) and an uninterrupted 5-step run: what resumes must equal."""
    tmp = tmp_path_factory.mktemp("dpo_resume")
    cfg = load_config("demo", DPO_RESUME + ["dpo.resources.max_failures=1"])
    prepare_pairs(["aqua:mcq/aqua_rat/dev.json"], shared_data, load_tokenizer(tiny_model), cfg.dpo, tmp / "pairs")
    clean = run_dpo(cfg, tmp / "pairs", tmp / "clean", "tiny-qwen3")
    return {"tmp": tmp, "cfg": cfg, "metrics": clean.metrics, "history": clean.history}


def crash_at(step: int) -> TrainOptions:
    return TrainOptions(hooks=TrainHooks(fail_at_step=step))


@pytest.mark.slow
def test_dpo_resumes_after_worker_death_with_identical_sample_order(dpo_clean):
    """A worker dies after step 3; Ray Train restarts it from the step-2 checkpoint; the pair ids every rank
    trained on, in order, the losses and the validations equal those of the uninterrupted run. (A crashed run
    submitted again by name, and a finished one, resume through the same training loop as SFT's:
    tests/test_sft.py::test_sft_resubmitted_crashed_or_finished_run_resumes.)"""
    tmp, cfg, clean, clean_h = dpo_clean["tmp"], dpo_clean["cfg"], dpo_clean["metrics"], dpo_clean["history"]
    result = run_dpo(cfg, tmp / "pairs", tmp / "crash", "tiny-qwen3", options=crash_at(3))
    crashed, crashed_h = result.metrics, result.history
    ids = clean_h.sample_ids  # [rank][step]: 2 ranks, 5 steps of 2 micro-batches of 1 pair
    assert len(ids) == 2 and all(len(r) == 5 and len(r[0]) == 2 for r in ids)
    assert clean["resumed_from_step"] is None and crashed["resumed_from_step"] == 2
    assert crashed["ref_logps_computed"] is False  # the pairs' stored reference log-probs, not a new pass
    assert crashed_h.sample_ids == clean_h.sample_ids
    assert crashed["steps"] == clean["steps"] == 5
    assert crashed_h.losses == pytest.approx(clean_h.losses, rel=1e-3)
    assert [e.step for e in crashed_h.evals] == [e.step for e in clean_h.evals] == [0, 2, 4, 5]
    assert crashed["val_reward_accuracy_best"] == pytest.approx(clean["val_reward_accuracy_best"])
