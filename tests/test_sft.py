"""SFT: prompt masking against HF's own labels loss, and a real Ray Train + DeepSpeed run on tiny-qwen3."""
import pytest
import torch

from stemqa.config import load_config
from stemqa.data.mcq import MCQ, load_file, write_records
from stemqa.models.loader import load_causal_lm, load_tokenizer
from stemqa.train.sft import collate, completion_loss, encode_mcq, run_sft

Q = MCQ("q1", "physics", "What is the unit of force?", ["joule", "newton", "watt", "pascal"], 1, "t")
Q2 = MCQ("q2", "college_chemistry", "Which is a noble gas? " * 5, ["neon", "iron"], 0, "t")


def test_encode_masks_prompt_and_keeps_answer(tiny_model):
    tok = load_tokenizer(tiny_model)
    s = encode_mcq(tok, Q, 512)
    assert tok.decode(s["completion"]) == " B" + tok.eos_token
    assert tok.decode(s["prompt"]).endswith("D. pascal\nAnswer:")
    short = encode_mcq(tok, Q, 12)  # prompt cut from the left, answer kept
    assert len(short["prompt"]) + len(short["completion"]) == 12 and short["completion"] == s["completion"]
    batch = collate([s, encode_mcq(tok, Q2, 512)], tok.pad_token_id)
    assert batch["completion_mask"].sum().item() == 2 * len(s["completion"])


def test_completion_loss_equals_hf_masked_labels_loss(tiny_model):
    """Our aligned-batch loss = HF's loss with labels -100 on the prompt, sample by sample, padding included."""
    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, device="cpu")
    samples = [encode_mcq(tok, Q, 512), encode_mcq(tok, Q2, 512)]
    with torch.no_grad():
        ours, n = completion_loss(model, collate(samples, tok.pad_token_id))
        total = 0.0
        for s in samples:
            ids = torch.tensor([s["prompt"] + s["completion"]])
            labels = ids.clone()
            labels[0, :len(s["prompt"])] = -100
            total += model(input_ids=ids, labels=labels).loss.item() * len(s["completion"])
    assert n == 4
    assert abs(ours.item() - total / n) < 1e-4
    with torch.no_grad():  # a loss over the prompt too would differ
        unmasked = model(input_ids=torch.tensor([samples[0]["prompt"] + samples[0]["completion"]]),
                         labels=torch.tensor([samples[0]["prompt"] + samples[0]["completion"]])).loss.item()
    assert abs(unmasked - ours.item()) > 1e-3


@pytest.mark.slow  # Ray Train start-up alone is ~45 s on 2 CPUs; 80-180 s in all here
def test_sft_run_saves_loadable_model_and_loss_falls(ray_local, shared_data, tiny_model, tmp_path):
    records, _ = load_file(shared_data / "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", source="arc",
                           subject="science", limit=40)
    write_records(records, tmp_path / "train.jsonl")
    cfg = load_config("demo", ["model.name=tiny-qwen3", "sft.lr=1e-3", "sft.max_steps=6", "sft.checkpoint_every=3",
                               "sft.resources.zero_stage=3"])
    result = run_sft(cfg, tmp_path / "train.jsonl", tmp_path / "out")
    m = result["metrics"]
    assert m["steps"] == 6 and m["train_samples"] == 36 and m["eval_samples"] == 4
    assert m["eval_loss"] < m["eval_loss_before"] - 0.1, m
    assert m["train_loss_last"] < m["train_loss_first"], m
    assert m["tokens"] > 0 and m["tokens_per_s"] > 0
    model = load_causal_lm(result["model_dir"], device="cpu")  # a plain HF dir, ZeRO-3 shards gathered
    base = load_causal_lm(tiny_model, device="cpu")
    key = "model.layers.0.self_attn.q_proj.weight"
    w, w0 = model.state_dict()[key], base.state_dict()[key]
    assert w.shape == w0.shape and not torch.equal(w, w0)
    assert (tmp_path / "out/model/model.safetensors").exists() and (tmp_path / "out/model/tokenizer.json").exists()


@pytest.mark.slow
def test_sft_resumes_after_worker_death_with_identical_sample_order(ray_local, shared_data, tmp_path):
    """A worker dies after step 3; Ray Train restarts from the step-2 checkpoint; the ids trained on, in order,
    and the losses equal those of an uninterrupted run (nothing skipped, nothing trained twice)."""
    records, _ = load_file(shared_data / "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", source="arc",
                           subject="science", limit=24)
    write_records(records, tmp_path / "train.jsonl")
    cfg = load_config("demo", ["model.name=tiny-qwen3", "sft.lr=1e-3", "sft.max_steps=5", "sft.checkpoint_every=2",
                               "sft.eval_fraction=0.0", "sft.grad_accum=2", "sft.resources.max_failures=1"])
    clean = run_sft(cfg, tmp_path / "train.jsonl", tmp_path / "clean", log_sample_ids=True)["metrics"]
    crashed = run_sft(cfg, tmp_path / "train.jsonl", tmp_path / "crash", log_sample_ids=True,
                      fail_at_step=3)["metrics"]
    assert len(clean["sample_ids"]) == 5 and len(clean["sample_ids"][0]) == 2 * 2  # 2 micro-batches of 2
    assert crashed["sample_ids"] == clean["sample_ids"]
    assert crashed["steps"] == clean["steps"] == 5
    assert crashed["train_loss_last"] == pytest.approx(clean["train_loss_last"], rel=1e-3)
