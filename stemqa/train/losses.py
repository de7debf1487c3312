"""DPO losses with TRL 1.16's definitions (trl/trainer/dpo_trainer.py, `_compute_loss`, reverse-KL DPO).

Each takes the policy-minus-reference log-ratios of the chosen and rejected completions (summed over their
tokens), β, ε (label smoothing) and the completion token counts, and returns one loss per pair:

- sigmoid: −log σ(β·h), h = chosen_logratio − rejected_logratio. ε is not used: TRL ≤ 0.x turned
  sigmoid + ε into conservative DPO (cDPO, (1−ε)·(−log σ(β·h)) + ε·(−log σ(−β·h))); TRL 1.16 dropped that and
  ignores ε here, so the config rejects ε > 0 with sigmoid rather than silently ignoring it.
- robust:  ((1−ε)·(−log σ(β·h)) + ε·log σ(−β·h)) / (1−2ε)   (robust DPO, Chowdhury et al. 2024: an unbiased
  loss under labels flipped with probability ε; not conservative DPO, and equal to sigmoid at ε = 0).
- ipo:     (h_avg − 1/(2β))², h_avg the difference of per-token *averaged* log-ratios (TRL normalises by
  each completion's token count); ε is not used (rejected by the config).

They are written out rather than called from TRL because TRL computes them inside `DPOTrainer._compute_loss`,
which needs the model forward; `tests/test_losses.py` runs that TRL code on the same log-probs and compares.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(chosen_lr, rejected_lr, beta, label_smoothing, chosen_len, rejected_len):
    return -F.logsigmoid(beta * (chosen_lr - rejected_lr))


def robust_loss(chosen_lr, rejected_lr, beta, label_smoothing, chosen_len, rejected_len):
    h = chosen_lr - rejected_lr
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * h)
    flipped = -label_smoothing * F.logsigmoid(-beta * h)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ipo_loss(chosen_lr, rejected_lr, beta, label_smoothing, chosen_len, rejected_len):
    h_avg = chosen_lr / chosen_len.clamp(min=1.0) - rejected_lr / rejected_len.clamp(min=1.0)
    return (h_avg - 1 / (2 * beta)) ** 2


LOSSES = {"sigmoid": sigmoid_loss, "robust": robust_loss, "ipo": ipo_loss}


# A reward margin within float noise is a tie, not a preference: the reference log-probs (Ray Data, batched by
# length) and the policy's forward pad differently, so an untrained policy's margins are about 1e-6, not exactly 0.
REWARD_TIE = 1e-4  # reward units (beta x log-prob); trained margins are orders of magnitude larger


def prefers_chosen(margin):
    """Whether reward margins (chosen - rejected; a tensor or an array) rank the chosen completion first."""
    return margin > REWARD_TIE


def dpo_loss(name: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0, chosen_len=None, rejected_len=None) -> dict:
    """Per-pair loss, rewards (β·log-ratio) and reward margins for the named loss."""
    if name not in LOSSES:
        raise ValueError(f"unknown DPO loss {name!r} (known: {', '.join(LOSSES)})")
    chosen_lr, rejected_lr = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    ones = torch.ones_like(chosen_lr)
    losses = LOSSES[name](chosen_lr, rejected_lr, beta, label_smoothing,
                          ones if chosen_len is None else chosen_len.to(chosen_lr.dtype),
                          ones if rejected_len is None else rejected_len.to(chosen_lr.dtype))
    chosen_reward, rejected_reward = beta * chosen_lr.detach(), beta * rejected_lr.detach()
    return {"losses": losses, "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
            "margin": chosen_reward - rejected_reward, "correct": prefers_chosen(chosen_reward - rejected_reward).float()}
