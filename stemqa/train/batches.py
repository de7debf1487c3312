"""Token batches for SFT and DPO and the log-probs of their completion tokens: padded (prompts left-padded,
completions right-padded) or packed into one padding-free row (`train.packing`)."""
from __future__ import annotations


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Prompts left-padded, completions right-padded, so every completion starts at the same column: the
    model then computes vocabulary logits for the completion columns only (`logits_to_keep`), not the prompt.
    With a 49k vocabulary those logits dominate time and memory on CPU."""
    import torch

    p_width = max(len(p) for p in prompts)
    c_width = max(len(c) for c in completions)
    n = len(prompts)
    ids = torch.full((n, p_width + c_width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    comp_mask = torch.zeros((n, c_width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, p_width - len(p):p_width] = torch.tensor(p)
        ids[i, p_width:p_width + len(c)] = torch.tensor(c)
        mask[i, p_width - len(p):p_width + len(c)] = 1
        comp_mask[i, :len(c)] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids,
            "completion_ids": ids[:, p_width:], "completion_mask": comp_mask}


def completion_token_logps(model, batch: dict):
    """log p(token) of each completion token [N, C] (0 on padding) from one forward of `model`."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    c_width = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device), logits_to_keep=c_width + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # column j predicts completion token j
    target = batch["completion_ids"].to(device)
    logp = -F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return logp * batch["completion_mask"].to(device)


def pack(samples: list[dict]) -> dict:
    """One padding-free row [1, T] with position_ids restarting per sample (`DataCollatorWithFlattening`).

    `logits_index` are the positions whose next token is a completion token, `targets` those tokens and
    `sample_of` the sample each belongs to: the model computes vocabulary logits at these positions only.
    """
    import torch
    from transformers import DataCollatorWithFlattening

    feats = [{"input_ids": s["prompt"] + s["completion"], "labels": [-100] * len(s["prompt"]) + s["completion"]}
             for s in samples]
    flat = DataCollatorWithFlattening(return_tensors="pt")(feats)
    labels = flat["labels"][0]
    at = (labels != -100).nonzero().squeeze(-1)  # the position of every completion token (never a row start)
    sample_of = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([len(f["input_ids"]) for f in feats]))
    return {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"], "logits_index": at - 1,
            "targets": labels[at], "sample_of": sample_of[at]}


def packed_token_logps(model, batch: dict):
    """log p(token) of every completion token of a packed row [K] (attention_mask None: transformers then
    derives the per-sample block-diagonal mask from the restarting position_ids)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                logits_to_keep=batch["logits_index"].to(device), use_cache=False)
    return -F.cross_entropy(out.logits[0].float(), batch["targets"].to(device), reduction="none")


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens the forward sees."""
    return int(batch["input_ids"].numel()) if "targets" in batch else int(batch["attention_mask"].sum())
