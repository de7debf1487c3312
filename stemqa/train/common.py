"""What SFT and DPO share: Ray Train settings, the DeepSpeed engine, the deterministic sample order, evaluation
batches that keep ranks in step and collectives (checkpoints: `stemqa.train.checkpoint`; token batches and
completion log-probs: `stemqa.train.batches`; the loop itself: `stemqa.train.loop`).

Sample order is hand-written rather than Ray Data's streaming split on purpose: a resumed run must train on
exactly the samples an uninterrupted run would, in the same order, and that needs the position to be a pure
function of the optimizer step stored in the checkpoint (`Schedule.micro_batch`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from stemqa.config.schema import LoraConfig, TrainResources


# ---------------------------------------------------------------- driver side: Ray Train settings
def scaling_config(res: TrainResources):
    import ray
    from ray.train import ScalingConfig

    if ray.is_initialized() and not res.use_gpu:
        warn_if_no_node_fits(ray.nodes(), res.cpus_per_worker)
    return ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                         resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": 1} if res.use_gpu else {})})


def warn_if_no_node_fits(nodes: list[dict], cpus_per_worker: float) -> bool:
    """Warn (and return False) when no alive node of the cluster has cpus_per_worker CPUs: Ray then keeps the train
    workers pending without a word (e.g. the study preset's 1.8-CPU worker on the 1-CPU nodes of cluster/local.sh).
    A warning, not an error: an autoscaler may still add a node that fits."""
    fits = any(n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= cpus_per_worker for n in nodes)
    if not fits:
        largest = max((n.get("Resources", {}).get("CPU", 0) for n in nodes if n.get("Alive")), default=0)
        logging.getLogger(__name__).warning(
            "no node of this Ray cluster has %s CPUs for a train worker (the largest has %s): the workers will wait "
            "until one joins; lower resources.cpus_per_worker or use a cluster whose nodes fit it", cpus_per_worker,
            largest)
    return fits


TCMALLOC = "tcmalloc_minimal"  # gperftools' tcmalloc without the heap profiler (libtcmalloc-minimal4)


@lru_cache(maxsize=1)
def tcmalloc_soname() -> Optional[str]:
    """The soname of tcmalloc on this node (ldconfig's cache), or None. A soname, not a path: the dynamic loader
    looks it up on each node, so a worker node that lacks it starts with glibc malloc instead of failing."""
    import ctypes.util

    return ctypes.util.find_library(TCMALLOC)


def worker_runtime_env(res: TrainResources) -> dict:
    """The train workers' runtime env: tcmalloc preloaded unless `res.allocator` is 'system'.

    Why: PyTorch's CPU tensors come from malloc, and glibc's malloc hands large blocks back to the kernel and
    maps fresh zeroed pages for the next step's activations and gradients (~110k page faults a step here);
    tcmalloc keeps them. Our CPU steps ran 15-19% faster with it (SmolLM2-135M, 2 threads). It can only be
    preloaded when a process starts, hence the worker processes' environment, not a call in the worker."""
    if res.allocator == "system":
        return {}
    lib = tcmalloc_soname()
    if lib is None:
        logging.getLogger(__name__).warning(
            "sft/dpo resources.allocator=tcmalloc but lib%s is not installed (Debian/Ubuntu: apt-get install "
            "libtcmalloc-minimal4); the train workers use the system allocator", TCMALLOC)
        return {}
    preload = " ".join(x for x in (lib, os.environ.get("LD_PRELOAD", "")) if x)
    # tcmalloc prints a line for every allocation over 1 GiB by default (a 0.6B model's logits in an eval)
    return {"env_vars": {"LD_PRELOAD": preload, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}}


def allocator_in_use() -> str:
    """'tcmalloc' when this process runs with tcmalloc mapped, else 'system' (reported with the run's metrics)."""
    try:
        return "tcmalloc" if "libtcmalloc" in Path("/proc/self/maps").read_text() else "system"
    except OSError:  # no procfs (macOS)
        return "system"


def run_config(out_dir: Path, name: str, res: TrainResources, keep: int = 1, quiet: bool = True,
               callbacks: Optional[list] = None):
    """`callbacks`: Ray Train UserCallbacks, e.g. Tune's TuneReportCallback when the run is a sweep trial."""
    import ray.train

    return ray.train.RunConfig(
        storage_path=str(Path(out_dir).resolve() / "ray"), name=name, callbacks=list(callbacks or []),
        worker_runtime_env=worker_runtime_env(res),
        failure_config=ray.train.FailureConfig(max_failures=res.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
        **({"logging_config": ray.train.LoggingConfig(log_level="WARNING")} if quiet else {}),
    )


def lora_peft_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), task_type="CAUSAL_LM")


def fit(trainer) -> dict:
    """Run a TorchTrainer; its last reported metrics (rank 0's), or the worker's error as one exception."""
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


# ---------------------------------------------------------------- worker side
def worker_setup(res: TrainResources) -> None:
    """Threads to match the CPUs this worker holds (fractional CPUs would otherwise be oversubscribed).

    Rounded, not floored: a lone worker given 1.9 of 2 CPUs (0.1 left for the driver) uses both cores."""
    import torch

    if not res.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: gloo, shm comm op
        clear_stale_build_lock(SHM_OP)
    torch.set_num_threads(max(1, round(res.cpus_per_worker)))
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)


SHM_OP = "deepspeed_shm_comm"  # the op DeepSpeed's CPU accelerator JIT-builds (or loads) in every engine init
STALE_LOCK_S = 900  # the build takes 1-2 min here, more under load: a lock this old has no builder behind it


def clear_stale_build_lock(op: str, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove torch's JIT-build lock of `op` when it is older than `max_age_s`; True if one was removed.

    torch's `cpp_extension.load` takes a lock file (FileBaton) around every build and makes any other process wait
    until the file is gone, with no timeout and no owner check. A process killed while building (an OOM kill, a
    killed run) leaves the file behind, and from then on every DeepSpeed init on CPU, hence every SFT/DPO run,
    waits forever with an idle CPU (seen here: a DPO run stuck in FileBaton.wait)."""
    import time

    from torch.utils.cpp_extension import _get_build_directory  # private, but the directory load() itself uses

    lock = Path(_get_build_directory(op, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    logging.getLogger(__name__).warning("removing %s: a build lock %.0f s old, left by a killed build", lock, age)
    lock.unlink(missing_ok=True)
    return True


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """Peak memory since `reset_peak_memory`: CUDA allocations on a GPU, else the process's peak RSS so far."""
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def load_train_model(base_path: str, lora: Optional[LoraConfig], bf16: bool, packed: bool = False,
                     zero_stage: int = 0):
    """`packed`: the model trains on padding-free packed rows, so its attention runs sample by sample
    (`stemqa.models.packed_attention`) instead of over the whole row with a block-diagonal mask."""
    import torch
    from transformers import AutoModelForCausalLM

    from stemqa.models import packed_attention

    attn = {"attn_implementation": packed_attention.register()} if packed else {}
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 use_safetensors=True, **attn)
    model.config.use_cache = False
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if lora is None and zero_stage < 3 and head is not None and emb.weight is head.weight:
        # Tied embeddings: the lookup's gradient (the rows of the batch's tokens) comes out sparse and is added
        # into lm_head's dense gradient, instead of a dense vocab x hidden tensor zero-filled and summed every
        # micro-batch: steady steps 7% faster (packed ARC, SmolLM2-135M, DeepSpeed ZeRO-0, 2 CPU threads, 3 A/B
        # runs). The sum is dense, so the optimizer and ZeRO <= 2 see what they saw. Untied, the weight's own
        # gradient would be sparse: left dense. ZeRO-3 gathers the weight in its own hooks: left alone.
        emb.sparse = True
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_peft_config(lora))
    return model


def use_bf16(res: TrainResources) -> bool:
    return res.bf16 is True or (res.bf16 == "auto" and res.use_gpu)


def linear_schedule(total_steps: int, warmup_steps: int):
    """HF's linear warm-up then linear decay to 0 (DeepSpeed's WarmupDecayLR gives lr 0 at step 0)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def make_engine(model, res: TrainResources, lr: float, micro_batch: int, grad_accum: int, total_steps: int,
                warmup_steps: int = 0):
    """A DeepSpeed engine with ZeRO `res.zero_stage`, grad accumulation and a linear LR schedule."""
    import deepspeed
    import torch
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1  # Ray Train (or session.run_in_trial) made it
    zero: dict = {"stage": res.zero_stage}
    if res.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if res.offload_params:  # the config allows it with ZeRO-3 only (TrainResources)
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(res)},
        "gradient_clipping": 1.0,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    params = [p for p in model.parameters() if p.requires_grad]
    if res.use_gpu or res.offload_optimizer:
        # DeepSpeed's own AdamW (fused on GPU, DeepSpeedCPUAdam when offloaded; both compile an op once).
        config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}}
        optimizer = None
    else:
        # fused: torch's for-loop AdamW (its CPU default) was 12% of a step here (py-spy, SmolLM2-135M)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    # A callable scheduler: DeepSpeed builds it on the optimizer it wraps, and saves it in its checkpoints.
    sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total_steps, warmup_steps))  # noqa: E731
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=sched, config=config)
    if world == 1 and res.zero_stage == 0:
        # One rank has nothing to all-reduce, yet DeepSpeed would flatten and copy every gradient at each
        # accumulation boundary (12% of a step on one CPU worker, py-spy). ZeRO >= 1 keeps its own flat
        # partitions and must still gather into them, so only stage 0 skips it.
        engine.enable_backward_allreduce = False
    return engine


@dataclass(frozen=True)
class Schedule:
    """Which samples each rank trains on at each micro-step: a seeded permutation per epoch, split by rank.

    The global micro-step k (= optimizer step * grad_accum + micro index) fixes the samples, so a run resumed
    from step s replays exactly what an uninterrupted run would; an incomplete last global batch is dropped.
    """

    n: int
    batch_size: int
    world: int
    grad_accum: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def micro_per_epoch(self) -> int:
        return self.n // self.global_batch

    def total_steps(self, epochs: float, max_steps: Optional[int]) -> int:
        """max_steps, when set, overrides epochs (as in HF's Trainer)."""
        if self.micro_per_epoch == 0:
            raise ValueError(f"{self.n} training samples are fewer than one global batch "
                             f"({self.batch_size} per worker x {self.world} workers)")
        if max_steps:
            return max_steps
        return max(1, math.floor(epochs * self.micro_per_epoch / self.grad_accum))

    def micro_batch(self, k: int, rank: int) -> list[int]:
        epoch, j = divmod(k, self.micro_per_epoch)
        start = j * self.global_batch + rank * self.batch_size
        return _permutation(self.n, self.seed, epoch)[start:start + self.batch_size].tolist()

    def step_samples(self, step: int) -> list[int]:
        """Every sample of one optimizer step, all ranks and micro-batches (each rank can list them all)."""
        return [i for micro in range(self.grad_accum) for r in range(self.world)
                for i in self.micro_batch(step * self.grad_accum + micro, r)]


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def eval_shard(n: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n, world))


def eval_batches(n: int, batch_size: int, rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches as (sample indices, real): the same number of batches on every rank.

    Under ZeRO-3 every forward gathers the parameters from all ranks, so a rank that ran one forward fewer
    than the others (5 samples, 2 ranks, batch 2: 2 batches vs 1) would leave them waiting forever. A rank
    with fewer batches runs dummy ones (sample 0, `real` False) whose results the caller discards."""
    mine = eval_shard(n, rank, world)
    longest = math.ceil(len(eval_shard(n, 0, world)) / batch_size)  # rank 0 holds the most
    batches = [(mine[i:i + batch_size], True) for i in range(0, len(mine), batch_size)]
    return batches + [([0], False)] * (longest - len(batches))


def step_weight(micro_weight: float, step_weight_sum: float, grad_accum: int, world: int) -> float:
    """Factor on a micro-batch's mean loss so that the optimizer step's gradient is the weighted mean over all the
    step's micro-batches and ranks (SFT: weight = completion tokens, as HF Trainer's `num_items_in_batch`, so TRL
    and we take the same step). DeepSpeed divides each backward by `grad_accum` and averages gradients over the
    `world` ranks; a plain mean per micro-batch would weigh a token of a short micro-batch more than one of a long."""
    return micro_weight * grad_accum * world / max(step_weight_sum, 1)


def all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (one element without a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank() -> int:
    from stemqa.train import session

    return session.current().rank()  # a Ray Train worker's rank, or 0 in a sweep trial training in its process


def world_size() -> int:
    from stemqa.train import session

    return session.current().world_size()
