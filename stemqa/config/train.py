"""The training sections of the config tree (part of `stemqa.config.schema`, which re-exports them): the
`TrainConfig` fields SFT and DPO share (one training loop reads them, stemqa.train.loop), each trainer's own
fields, LoRA and the Ray Train / DeepSpeed resources."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field, model_validator

from stemqa.config.section import Section


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="Modules given adapters.")


class TrainResources(Section):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks).")
    cpus_per_worker: float = Field(0.45, gt=0, description="CPUs per worker; fractional so the trainer fits on 2 CPUs.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    offload_optimizer: bool = Field(False, description="DeepSpeed optimizer state offload to CPU.")
    offload_params: bool = Field(False, description="DeepSpeed parameter offload to CPU (ZeRO-3 only).")
    bf16: Literal["auto", True, False] = Field("auto", description="bf16 training; 'auto' = on GPU only.")
    max_failures: int = Field(
        1, ge=0, description="Worker failures Ray Train recovers from (resuming from the last recorded checkpoint)."
    )
    allocator: Literal["tcmalloc", "system"] = Field(
        "tcmalloc", description="Memory allocator of the train workers. 'tcmalloc': gperftools' tcmalloc preloaded "
        "into each worker (Debian/Ubuntu libtcmalloc-minimal4; `./run.sh setup` installs it when run as root); "
        "CPU SFT steps ran 8-19% faster than with glibc malloc (benchmarks/BENCHMARKS.md). Where it is not installed "
        "the workers run with the system allocator and a warning says so. 'system': glibc malloc.",
    )

    @model_validator(mode="after")
    def _offload_params_needs_zero3(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params=true needs zero_stage=3 (got zero_stage={self.zero_stage}): DeepSpeed "
                             "offloads parameters only when ZeRO-3 partitions them")
        return self


# Fields every trainer has; a subclass gives its own default with `lr: LearningRate = 1e-6` and keeps the
# constraint and the description (an Annotated type carries them, a plain re-declaration would drop them).
LearningRate = Annotated[float, Field(gt=0, description="Peak learning rate (AdamW).")]
BatchSize = Annotated[int, Field(ge=1, description="Samples (SFT: sequences, DPO: pairs) per worker per micro-batch.")]
EvalEvery = Annotated[Optional[int], Field(ge=1, description="Validate every N optimizer steps (and after the last "
                                           "one); null = before training and after the last step only.")]


class TrainConfig(Section):
    """What SFT and DPO share: one training loop (stemqa.train.loop) reads these; each trainer adds its own."""

    enabled: bool = Field(True, description="Run this stage in the pipeline.")
    lr: LearningRate = 1e-5
    epochs: float = Field(1.0, gt=0, description="Passes over the training set.")
    max_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: BatchSize = 4
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    eval_every: EvalEvery = None
    checkpoint_every: int = Field(50, ge=1, description="Report a checkpoint every N optimizer steps.")
    lora: Optional[LoraConfig] = Field(None, description="LoRA adapters; null = full fine-tuning.")
    seed: int = Field(0, description="Seed for data order and initialisation.")
    packing: bool = Field(
        False, description="Padding-free packing: each micro-batch's sequences (SFT: its samples; DPO: every pair's "
        "prompt+chosen and prompt+rejected) are one row with position_ids restarting per sequence (transformers' "
        "DataCollatorWithFlattening), which transformers turns into a block-diagonal mask (sdpa/eager) or "
        "FlashAttention varlen, so sequences never attend to each other; the model is loaded with stemqa's packed "
        "attention, which attends within each sequence's span only instead of over the masked row. Same samples, "
        "order and loss as unpacked; no padding tokens are computed. A packed micro-batch costs its real tokens "
        "only, so a larger batch_size with less grad_accum (same effective batch) runs fewer, larger matrix "
        "products: see benchmarks/BENCHMARKS.md, Training speed.")
    resources: TrainResources = Field(default_factory=TrainResources)


class SFTConfig(TrainConfig):
    max_seq_len: int = Field(512, ge=16, description="Sequences are truncated to this many tokens.")
    data: Literal["mcq", "qa"] = Field(
        "mcq", description="What the training file holds: mcq = MCQ records (stemqa data's output), trained as the "
        "harness prompt -> ' <letter>'; qa = open-ended `{question, answer}` JSONL (stemqa.data.qa), trained as "
        "'Question: ..\\nAnswer:' -> ' <answer>'. Either way the loss is on the completion tokens only.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Linear warm-up share of the steps.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the data held out for the eval loss.")


DEFAULT_SPLIT = (0.8, 0.1, 0.1)


class DPOConfig(TrainConfig):
    lr: LearningRate = 1e-6
    batch_size: BatchSize = 2
    eval_every: EvalEvery = 20
    loss: Literal["sigmoid", "robust", "ipo"] = Field(
        "sigmoid", description="DPO loss, as defined in TRL 1.16: sigmoid = standard DPO −log σ(β·h); robust = robust "
        "DPO (Chowdhury et al.) with label_smoothing ε; ipo = IPO on per-token-averaged log-ratios.")
    beta: float = Field(0.1, gt=0, description="DPO beta.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Label smoothing ε, the assumed probability that a preference label is "
        "flipped; used by loss `robust` only (robust DPO, TRL's definition). TRL 1.16 ignores ε for `sigmoid` "
        "(older TRL made sigmoid+ε conservative DPO) and `ipo`, so ε > 0 with those losses is rejected.")
    max_len: int = Field(1024, ge=16, description="Pairs with prompt+completion above this many tokens are dropped.")
    split: Optional[tuple[float, float, float]] = Field(
        None, description=f"Train/val/test shares of the pairs; null = {DEFAULT_SPLIT} unless split_sizes is set.")
    split_sizes: Optional[tuple[int, int, int]] = Field(
        None, description="Absolute train/val/test sizes (seed: 24000/3000/3000), instead of split (set one of them).")
    stem_filter: bool = Field(True, description="Keep only pairs that match the STEM keyword filter.")
    skip_invalid: bool = Field(False, description="Skip malformed preference rows (counted in prep.json) instead of failing.")
    patience: int = Field(3, ge=1, description="Early stop after this many evals without a better val reward accuracy.")
    reference: Optional[str] = Field(None, description="Reference model; default: the model DPO starts from.")
    ref_batch_size: int = Field(8, ge=1, description="Pairs per batch in the Ray Data job computing reference log-probs.")
    ref_cpus: float = Field(1.0, gt=0, description="CPUs of the reference log-prob actor (torch threads match it).")

    @model_validator(mode="after")
    def _smoothing_only_for_robust(self):
        if self.label_smoothing > 0 and self.loss != "robust":
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} has no effect with dpo.loss={self.loss!r} "
                             "(TRL's definition uses ε only in 'robust'); set dpo.loss=robust or label_smoothing=0")
        if self.split is not None and self.split_sizes is not None:
            raise ValueError(f"dpo.split={list(self.split)} and dpo.split_sizes={list(self.split_sizes)} are both "
                             "set; give shares (split) or absolute sizes (split_sizes), not both")
        return self

    @property
    def shares(self) -> tuple[float, float, float]:
        """The train/val/test shares used when split_sizes is not set."""
        return self.split or DEFAULT_SPLIT
