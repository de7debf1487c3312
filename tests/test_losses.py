"""Our DPO losses against TRL 1.16's own `DPOTrainer._compute_loss`, run on the same log-probs.

TRL computes the loss inside `_compute_loss` from a model forward; a stand-in model returns chosen/rejected
per-token log-probs that sum to the sequence log-probs we choose, so TRL's real loss code runs unchanged.
"""
from types import SimpleNamespace

import pytest
import torch
from trl import DPOTrainer

from stemqa.train.losses import LOSSES, dpo_loss


class _PerTokenLogps:
    """Stands in for TRL's fused-head model output: given per-token log-probs, what `_compute_loss` reads."""

    def __init__(self, per_token):
        self.per_token, self.training = per_token, True

    def __call__(self, **kwargs):
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool())


def _trl_loss(loss_type, per_token, completion_mask, ref_chosen, ref_rejected, beta, eps):
    model = _PerTokenLogps(per_token)
    acc = SimpleNamespace(device="cpu", gather=lambda t: t, gather_for_metrics=lambda t: t)
    fake_self = SimpleNamespace(
        model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=eps, use_weighting=False, _metrics={"train": __import__("collections").defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(fake_self, model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type,beta,eps", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.2),  # TRL 1.16's sigmoid ignores ε
    ("robust", 0.1, 0.2), ("robust", 0.3, 0.0), ("robust", 0.5, 0.1), ("robust", 0.1, 0.45),
    ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0), ("ipo", 0.1, 0.2)])
def test_losses_equal_trl(loss_type, beta, eps):
    g = torch.Generator().manual_seed(0)
    n, width = 6, 12
    # completion lengths differ per sequence, so IPO's per-token normalisation matters
    lengths = torch.randint(2, width, (2 * n,), generator=g)
    completion_mask = torch.zeros(2 * n, width + 1, dtype=torch.long)  # position 0 is the prompt
    completion_mask[:, 1:] = (torch.arange(width)[None] < lengths[:, None]).long()
    per_token = -torch.rand(2 * n, width, generator=g) * 3 * completion_mask[:, 1:]
    ref = per_token.sum(1) + torch.randn(2 * n, generator=g)
    ref_chosen, ref_rejected = ref[:n], ref[n:]
    trl_loss = _trl_loss(loss_type, per_token, completion_mask, ref_chosen, ref_rejected, beta, eps)
    logps, lens = per_token.sum(1), completion_mask.sum(1)
    ours = dpo_loss(loss_type, logps[:n], logps[n:], ref_chosen, ref_rejected, beta, eps, lens[:n], lens[n:])
    assert torch.allclose(ours["losses"].mean(), trl_loss, atol=1e-6), (ours["losses"].mean(), trl_loss)


def test_robust_is_not_conservative_dpo():
    """ε > 0 changes robust's value, and not into cDPO's (1−ε)·(−log σ(βh)) + ε·(−log σ(−βh))."""
    import torch.nn.functional as F

    h = torch.tensor([2.0, -1.0, 0.5])
    z = torch.zeros(3)
    plain = dpo_loss("robust", h, z, z, z, beta=0.5)["losses"]
    robust = dpo_loss("robust", h, z, z, z, beta=0.5, label_smoothing=0.2)["losses"]
    cdpo = -0.8 * F.logsigmoid(0.5 * h) - 0.2 * F.logsigmoid(-0.5 * h)
    assert torch.allclose(plain, dpo_loss("sigmoid", h, z, z, z, beta=0.5)["losses"])
    assert not torch.allclose(robust, plain) and not torch.allclose(robust, cdpo)


def test_config_rejects_smoothing_that_would_be_ignored():
    from pydantic import ValidationError

    from stemqa.config.schema import DPOConfig

    assert DPOConfig(loss="robust", label_smoothing=0.1).label_smoothing == 0.1
    for loss in ("sigmoid", "ipo"):
        with pytest.raises(ValidationError, match=f"label_smoothing=0.1 has no effect with dpo.loss='{loss}'"):
            DPOConfig(loss=loss, label_smoothing=0.1)


def test_rewards_and_accuracy():
    out = dpo_loss("sigmoid", torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -2.0]),
                   torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.5)
    assert torch.allclose(out["chosen_reward"], torch.tensor([0.5, -1.5]))
    assert torch.allclose(out["margin"], torch.tensor([1.0, -1.5]))
    assert out["correct"].tolist() == [1.0, 0.0]


def test_table_and_unknown_loss():
    assert set(LOSSES) == {"sigmoid", "robust", "ipo"}
    with pytest.raises(ValueError, match="unknown DPO loss 'hinge'"):
        dpo_loss("hinge", *[torch.zeros(1)] * 4, beta=0.1)
