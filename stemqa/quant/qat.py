"""QAT: quantization-aware training with torchao's fake quantizers, exported to compressed-tensors W{4,2}A16.

1. prepare: torchao `QATConfig(IntxFakeQuantizeConfig(int4|int2, group_size, symmetric, range_learning=True))`
   swaps every Linear except lm_head for a FakeQuantizedLinear whose per-group scales are nn.Parameters
   (learnable, LSQ-style; initialised from the weights' absmax by one forward pass).
2. train: the quantized Linears' weights and scales end to end (EfficientQAT's E2E stage, here also updating
   the weights; embeddings, norms and lm_head frozen) with the causal-LM loss on SFT texts (harness prompt + answer), `qat_steps` AdamW steps.
3. export: torchao's own `convert` step produces torchao tensor subclasses, which plain transformers cannot
   load on CPU (its int4 path needs CUDA kernels) and vLLM does not read; so the learned scales are written by
   hand into compressed-tensors' scheme (the same pack-quantized format the GPTQ path saves) and the model is
   saved with llm-compressor's compressed save_pretrained. Reloads with plain transformers + compressed-tensors.
The symmetric integer grid (zero point 0) is the same in both libraries: q = clamp(round(w / s), qmin, qmax).
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

from stemqa.config.schema import QuantConfig
from stemqa.quant.errors import QuantError

KEEP = ["lm_head"]


def _torch_dtype(bits: int):
    import torch

    return {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}[bits]


def prepare(model, bits: int, group_size: int, example_ids) -> None:
    """Swap the model's Linears (not lm_head) for torchao fake-quantized ones with learnable scales, in place;
    one forward on `example_ids` initialises the scales from the weights."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig, initialize_fake_quantizers

    wcfg = IntxFakeQuantizeConfig(_torch_dtype(bits), group_size=group_size, is_symmetric=True,
                                  range_learning=True, is_dynamic=False)
    quantize_(model, QATConfig(weight_config=wcfg, step="prepare"),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.split(".")[-1] not in KEEP)
    initialize_fake_quantizers(model, (example_ids,))


def fake_quantized_layers(model) -> dict:
    """{module name: FakeQuantizedLinear} of a prepared model."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "weight_fake_quantizer")}


def batches(tokenizer, texts: Sequence[str], batch_size: int, max_len: int, seed: int):
    """Endless shuffled batches (input_ids, attention_mask, labels with padding masked out)."""
    order = list(range(len(texts)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            enc = tokenizer([texts[j] for j in order[i:i + batch_size]], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_len)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            yield enc.input_ids, enc.attention_mask, labels


def lm_loss(model, tokenizer, texts: Sequence[str], max_len: int, batch_size: int = 8) -> float:
    """Mean causal-LM loss (per token) of `model` on `texts`; used to show QAT lowered the fake-quant loss."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_len)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(**enc, labels=labels).loss) * n
            count += n
    return total / max(1, count)


def train(model, tokenizer, texts: Sequence[str], qcfg: QuantConfig) -> list[float]:
    """`qcfg.qat_steps` AdamW steps on weights + learned scales; returns the loss of every step."""
    import torch

    # Only the quantized Linears' weights and their scales learn; embeddings, lm_head (tied to the embeddings in
    # SmolLM2) and norms stay exactly the source model's, so "lm_head in full precision" means unchanged too.
    trainable = {id(p) for m in fake_quantized_layers(model).values() for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=qcfg.qat_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(  # cosine decay: the last steps settle the rounding choices
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, qcfg.qat_steps))))
    losses = []
    data = batches(tokenizer, texts, qcfg.qat_batch_size, qcfg.max_seq_len, qcfg.seed)
    for _ in range(qcfg.qat_steps):
        ids, mask, labels = next(data)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # range learning must not drive a scale to 0 or below
            for m in fake_quantized_layers(model).values():
                m.weight_fake_quantizer.scale.clamp_(min=1e-9)
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def export(model, qcfg: QuantConfig, out_dir: Path, tokenizer) -> None:
    """Turn the prepared model back into plain Linears carrying compressed-tensors quantization (the learned
    scales, zero point 0) and save it packed (`pack-quantized`), loadable with plain `from_pretrained`."""
    import torch
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    scales = {n: m.weight_fake_quantizer.scale.detach().clone() for n, m in fake_quantized_layers(model).items()}
    quantize_(model, QATConfig(step="convert"))  # no base config: only swaps back to nn.Linear (same weights)
    args = QuantizationArgs(num_bits=qcfg.bits, type="int", symmetric=True, strategy="group",
                            group_size=qcfg.group_size)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=KEEP, quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, m in model.named_modules():
            if getattr(m, "quantization_scheme", None) is None:
                continue
            if name not in scales:
                raise QuantError(f"qat export: layer {name} has a quantization scheme but no learned scale")
            m.weight_scale.copy_(scales[name].reshape(m.weight_scale.shape).to(m.weight_scale.dtype))
            m.weight_zero_point.zero_()
            m.quantization_status = QuantizationStatus.FROZEN
    modify_save_pretrained(model)
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
