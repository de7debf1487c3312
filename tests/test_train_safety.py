"""Training that is never silently wrong: ZeRO-3 validation on an eval set that does not split evenly over the
ranks, reference log-probs recomputed whenever what they depend on changes, checkpoints loaded without
unpickling arbitrary objects, the RNG state stored as safetensors, and no run left waiting on a build lock that
a killed build left behind."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from stemqa.config import load_config
from stemqa.data.preference import Pair, read_pairs, write_pairs
from stemqa.train import common

ROOT = Path(__file__).resolve().parents[1]


def test_eval_batches_give_every_rank_the_same_number_of_forwards():
    """5 samples, 2 ranks, batch 2: rank 0 holds 3 (2 batches), rank 1 holds 2 (1 batch, plus a dummy one)."""
    r0, r1 = common.eval_batches(5, 2, 0, 2), common.eval_batches(5, 2, 1, 2)
    assert r0 == [([0, 2], True), ([4], True)]
    assert r1 == [([1, 3], True), ([0], False)]
    for n, batch, world in [(1, 4, 3), (7, 3, 2), (16, 2, 4), (0, 2, 2)]:
        per_rank = [common.eval_batches(n, batch, r, world) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1, (n, batch, world)
        real = sorted(i for b in per_rank for idx, ok in b if ok for i in idx)
        assert real == list(range(n))  # every sample counted once, dummies never


@pytest.mark.slow  # a Ray Train run with 2 workers under ZeRO-3: ~1-2 min on 2 CPUs
def test_zero3_validation_with_an_uneven_split_finishes_and_counts_every_sample(ray_local, shared_data,
                                                                                  tiny_model, tmp_path):
    """ZeRO-3 gathers the parameters in every forward, so a rank with one validation batch fewer would wait
    forever for the other: with 5 held-out samples on 2 ranks (batch 2) the run finishes, and its eval loss is
    the token-weighted loss over exactly those 5 samples, computed here in one process."""
    from stemqa.data.mcq import load_file, write_records
    from stemqa.models.loader import load_causal_lm, load_tokenizer
    from stemqa.train.sft import collate, completion_loss, prepare_samples, run_sft

    records, _ = load_file(shared_data / "mcq/arc/ARC-Easy-train.jsonl", "arc_jsonl", subject="science", limit=15)
    write_records(records, tmp_path / "train.jsonl")
    cfg = load_config("demo", ["model.name=tiny-qwen3", "sft.max_steps=1", "sft.batch_size=2",
                               "sft.eval_fraction=0.3333", "sft.checkpoint_every=1000", "sft.max_seq_len=128",
                               "sft.resources.zero_stage=3", "sft.resources.num_workers=2",
                               "sft.resources.max_failures=0", "sft.lr=1e-3"])
    tok = load_tokenizer(tiny_model)
    train, held = prepare_samples(cfg, tmp_path / "train.jsonl", tok)
    assert len(held) == 5 and len(train) == 10
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=run_sft(cfg, tmp_path / "train.jsonl", tmp_path / "out")),
                              daemon=True)
    worker.start()
    worker.join(timeout=900)
    assert not worker.is_alive(), "the ZeRO-3 run did not finish: a rank is waiting in a validation forward"
    m = out["r"].metrics
    model = load_causal_lm(tiny_model, device="cpu")
    with torch.no_grad():
        sums = [(float(loss) * n, n) for loss, n in (completion_loss(model, collate([s], tok.pad_token_id))
                                                      for s in held)]
    assert m["eval_loss_before"] == pytest.approx(sum(a for a, _ in sums) / sum(n for _, n in sums), rel=1e-4)
    assert m["steps"] == 1 and [e.step for e in out["r"].history.evals] == [0, 1]


PAIRS = [Pair("a", "Question: 2 + 3 = ?\nAnswer:", " 5", " 7", "t"),
         Pair("b", "Question: What is H2O?\nAnswer:", " water", " salt", "t"),
         Pair("c", "Question: Speed of light?\nAnswer:", " 3e8 m/s", " 10 m/s", "t")]


def test_reference_logps_are_recomputed_when_a_pair_or_the_reference_changes(ray_local, tiny_model, tmp_path):
    """The cache key is the reference model's files, the pairs' texts and max_len, not the model's path and the
    pair ids: editing one pair's text, or retraining the reference into the same directory, recomputes."""
    import shutil

    from stemqa.train.dpo import reference_logps

    cfg = load_config("demo", ["dpo.max_len=64", "dpo.ref_cpus=0.5"]).dpo
    pairs_dir, model_dir = tmp_path / "pairs", tmp_path / "reference"
    shutil.copytree(tiny_model, model_dir)
    write_pairs(PAIRS[:2], pairs_dir / "train.jsonl")
    write_pairs(PAIRS[2:], pairs_dir / "val.jsonl")

    def scores():
        pairs = {s: read_pairs(pairs_dir / f"{s}.jsonl") for s in ("train", "val")}
        return reference_logps(pairs_dir, str(model_dir), pairs, cfg)

    first = scores()
    assert first["computed"] is True and scores()["computed"] is False  # unchanged: reused
    edited = [PAIRS[0], Pair("b", PAIRS[1].prompt, " water, H2O", PAIRS[1].rejected, "t")]  # same id, new text
    write_pairs(edited, pairs_dir / "train.jsonl")
    second = scores()
    assert second["computed"] is True and second["dir"] != first["dir"]
    assert second["scores"]["train"]["b"]["chosen_logp"] != pytest.approx(first["scores"]["train"]["b"]["chosen_logp"])
    assert second["scores"]["train"]["a"] == pytest.approx(first["scores"]["train"]["a"])  # the same pair, same score
    # the reference retrained into the same directory (other weights, same path): recomputed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(model_dir)
    third = scores()
    assert third["computed"] is True and third["dir"] != second["dir"]
    assert third["scores"]["val"]["c"]["chosen_logp"] != pytest.approx(second["scores"]["val"]["c"]["chosen_logp"])


CHECKPOINT_SCRIPT = textwrap.dedent("""
    import json, os, pickle, socket, sys
    import torch, torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo")
    from stemqa.config.schema import TrainResources
    from stemqa.train import checkpoint, common
    out = {}
    for stage in (0, 2, 3):
        res = TrainResources(num_workers=1, zero_stage=stage)
        model = common.load_train_model(sys.argv[1], None, False, zero_stage=stage)
        engine = common.make_engine(model, res, 1e-3, 1, 1, 10)
        checkpoint.weights_only_engine(engine)
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        engine.backward(engine(input_ids=ids, labels=ids).loss); engine.step()
        d = os.path.join(sys.argv[2], f"z{stage}")
        engine.save_checkpoint(d, tag="ds")
        before = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        engine.load_checkpoint(d, tag="ds")  # every file through torch.load(weights_only=True)
        out[stage] = all(torch.equal(before[k], v) for k, v in engine.module.state_dict().items())
    # a checkpoint file that would run code when unpickled is refused, not executed
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + os.path.join(sys.argv[2], "pwned"),))
    bad = os.path.join(sys.argv[2], "z0", "ds", "mp_rank_00_model_states.pt")
    torch.save({"module": Boom()}, bad)
    try:
        engine.checkpoint_engine.load(bad)
        out["refused"] = False
    except pickle.UnpicklingError as e:
        out["refused"] = "weights_only" in str(e) or "Unsupported global" in str(e)
    out["executed"] = os.path.exists(os.path.join(sys.argv[2], "pwned"))
    print("RESULT " + json.dumps(out))
""")


def test_deepspeed_checkpoints_load_weights_only_and_a_pickle_is_refused(tiny_model, tmp_path):
    """ZeRO-0/2/3 checkpoints of our engine save and load back through torch.load(weights_only=True); a file
    holding an object whose unpickling would run a command is refused and the command never runs. (A process of
    its own: DeepSpeed keeps a process group and global state.)"""
    out = subprocess.run([sys.executable, "-c", CHECKPOINT_SCRIPT, tiny_model, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result == {"0": True, "2": True, "3": True, "refused": True, "executed": False}, result


def test_rng_state_round_trips_through_safetensors(tmp_path):
    import numpy as np

    from stemqa.train.checkpoint import load_rng, save_rng

    torch.manual_seed(3)
    np.random.seed(4)
    save_rng(tmp_path / "rng.safetensors")
    want = (torch.rand(3), np.random.rand(3))
    torch.rand(10), np.random.rand(10)  # move both on
    load_rng(tmp_path / "rng.safetensors")
    assert torch.equal(torch.rand(3), want[0]) and np.array_equal(np.random.rand(3), want[1])
    from safetensors import safe_open  # a plain safetensors file: tensors and string metadata, nothing pickled

    with safe_open(str(tmp_path / "rng.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"torch", "numpy_keys"} and "numpy" in f.metadata()


def test_stale_jit_build_lock_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock file, on which every later DeepSpeed init on CPU would wait
    forever; an old one is removed, a recent one (a build in progress) is left to its builder."""
    import os
    import time

    from stemqa.train.common import STALE_LOCK_S, clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert clear_stale_build_lock("some_op") is False  # no lock: nothing to do
    lock = next(tmp_path.rglob("some_op")) / "lock"
    lock.touch()
    assert clear_stale_build_lock("some_op") is False and lock.exists()
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert clear_stale_build_lock("some_op") is True and not lock.exists()


def test_a_train_worker_that_fits_no_node_is_warned_about(caplog):
    # the study preset's 1.8-CPU worker on cluster/local.sh's two 1-CPU nodes: Ray would keep it pending silently
    nodes = [{"Alive": True, "Resources": {"CPU": 1.0}}, {"Alive": True, "Resources": {"CPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 4.0}}]
    with caplog.at_level("WARNING"):
        assert common.warn_if_no_node_fits(nodes, 1.8) is False
    assert "1.8 CPUs" in caplog.text and "the largest has 1.0" in caplog.text
    caplog.clear()
    assert common.warn_if_no_node_fits(nodes, 1.0) is True
    assert common.warn_if_no_node_fits(nodes + [{"Alive": True, "Resources": {"CPU": 2.0}}], 1.8) is True
    assert caplog.text == ""
