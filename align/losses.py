"""Preference losses on per-response log-likelihoods: LOGO (the default) and the SimPO, DPO and ORPO baselines.

All four read the same `ResponseLogps` (summed log-probability and token count of every response, preferred first),
so they run on the same data and trainer; only DPO needs a second `ResponseLogps` from a reference model.

LOGO (arXiv 2410.18533, eq. 3), with M dis-preferred responses and mean_logp the per-token mean log-probability:

    L = -log sigmoid(beta * mean_logp(y_w) - beta * (1/M) sum_j mean_logp(y_l_j) - gamma) + lambda * NLL(y_w)

NLL(y_w) is the token-mean cross-entropy of the preferred responses of the batch (summed over their tokens, divided
by their token count). The released code computes that term without shifting logits against labels; here every
log-probability comes from `packing.py`, which scores token t with the logits of the position before it.

The baselines are the published pairwise losses. With M > 1 dis-preferred responses they are averaged over the M
pairs (y_w, y_l_j), which is the standard loss when M = 1 — unlike LOGO, which averages the log-likelihoods of the
dis-preferred responses inside the sigmoid.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from core.errors import UserError

LOSSES = ("logo", "simpo", "dpo", "orpo", "sft")

# LOGO's published settings per base model (paper, Table 7 and the released scripts): beta, gamma = beta *
# gamma_beta_ratio, lambda (sft_weight), M (num_rejected).
LOGO_PRESETS: dict[str, dict[str, float | int]] = {
    "llama3-8b": {"beta": 10.0, "gamma": 3.0, "sft_weight": 0.1, "num_rejected": 2},
    "mistral-7b": {"beta": 2.5, "gamma": 0.25, "sft_weight": 0.1, "num_rejected": 2},
    "llama2-7b": {"beta": 3.0, "gamma": 0.6, "sft_weight": 0.1, "num_rejected": 2},
}


@dataclasses.dataclass
class LossConfig:
    """Which preference loss and its weights. Defaults: LOGO on Llama-3-8B (the paper's main setting)."""

    loss: Literal["logo", "simpo", "dpo", "orpo", "sft"] = "logo"
    """logo (reference-free, M dis-preferred, SFT term); simpo, dpo (needs a reference model), orpo: baselines;
    sft: NLL of the preferred response only (instruction tuning on the same data: the paper's SFT comparison)."""
    beta: float = 10.0
    """Scale of the length-normalised margin (logo, simpo). LOGO: 10 for Llama-3-8B, 2.5 Mistral-7B, 3 Llama-2-7B.
    Larger beta saturates the sigmoid sooner; lower it for models whose mean log-likelihoods differ less."""
    gamma: float = 3.0
    """Target margin subtracted inside the sigmoid (logo, simpo); LOGO: beta * gamma_beta_ratio = 10 * 0.3."""
    sft_weight: float = 0.1
    """lambda: weight of the NLL of the preferred response in LOGO (0.1 in all LOGO settings; the ablation with 0 lost
    0.7 LongBench points). Baselines ignore it: SimPO and DPO have no SFT term, ORPO has its own (weight 1)."""
    num_rejected: int = 2
    """M: how many of each row's dis-preferred responses are used (LOGO: 2; M = 1 turns LOGO into SimPO + SFT)."""
    dpo_beta: float = 0.1
    """DPO's beta on the summed log-ratio against the reference (DPO paper default 0.1)."""
    orpo_weight: float = 0.1
    """ORPO's lambda on the odds-ratio term, added to the NLL of the preferred response (ORPO paper: 0.1)."""

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.num_rejected < 1:
            raise UserError(f"num_rejected must be at least 1 (a preference needs a dis-preferred response), got {self.num_rejected}")
        if self.beta <= 0 or self.dpo_beta <= 0:
            raise UserError("beta and dpo_beta must be positive")

    @property
    def needs_reference(self) -> bool:
        return self.loss == "dpo"

    @property
    def responses_used(self) -> int:
        """Responses per row the loss reads: the preferred one, plus M dis-preferred unless it is SFT."""
        return 1 if self.loss == "sft" else 1 + self.num_rejected


def logo_preset(name: str, **overrides) -> LossConfig:
    """`LossConfig` with LOGO's published settings for a base model (`llama3-8b`, `mistral-7b`, `llama2-7b`)."""
    if name not in LOGO_PRESETS:
        raise UserError(f"unknown LOGO preset {name!r}; known: {', '.join(LOGO_PRESETS)}")
    return LossConfig(**{**LOGO_PRESETS[name], **overrides})


@dataclasses.dataclass
class ResponseLogps:
    """Log-likelihoods of every response of every row, shape [batch, 1 + M]: column 0 is the preferred response."""

    sum_logp: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def mean_logp(self) -> torch.Tensor:
        return self.sum_logp / self.num_tokens.clamp(min=1).to(self.sum_logp.dtype)

    def first(self, responses: int) -> "ResponseLogps":
        """Keep the preferred and the first `responses - 1` dis-preferred responses."""
        return ResponseLogps(self.sum_logp[:, :responses], self.num_tokens[:, :responses])

    def detach(self) -> "ResponseLogps":
        return ResponseLogps(self.sum_logp.detach(), self.num_tokens)


def preferred_nll(policy: ResponseLogps) -> torch.Tensor:
    """Token-mean cross-entropy of the preferred responses over the whole batch."""
    return -policy.sum_logp[:, 0].sum() / policy.num_tokens[:, 0].sum().clamp(min=1)


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for log-probabilities x < 0, stable near 0 (where a mean log-probability can sit)."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def preference_loss(
    config: LossConfig, policy: ResponseLogps, reference: ResponseLogps | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured loss (a scalar, mean over the batch) and metrics for logging."""
    if config.loss == "sft":
        nll = preferred_nll(policy).float()
        return nll, {"loss": nll.item(), "nll_chosen": nll.item(),
                     "logp_chosen": policy.mean_logp[:, 0].float().mean().item()}
    responses = config.num_rejected + 1
    if policy.sum_logp.shape[1] < responses:
        raise UserError(f"the batch holds {policy.sum_logp.shape[1] - 1} dis-preferred responses per row; "
                        f"num_rejected={config.num_rejected} needs that many")
    policy = policy.first(responses)
    mean = policy.mean_logp.float()
    chosen, rejected = mean[:, 0], mean[:, 1:]
    nll = preferred_nll(policy).float()

    if config.loss == "logo":
        margin = config.beta * (chosen - rejected.mean(dim=1)) - config.gamma
        preference = -F.logsigmoid(margin).mean()
        loss = preference + config.sft_weight * nll
    elif config.loss == "simpo":
        margin = config.beta * (chosen[:, None] - rejected) - config.gamma
        preference = -F.logsigmoid(margin).mean()
        loss = preference
    elif config.loss == "dpo":
        if reference is None:
            raise ValueError("DPO needs the reference model's log-likelihoods")
        reference = reference.first(responses)
        ratio = (policy.sum_logp - reference.sum_logp.to(policy.sum_logp.device)).float()
        margin = config.dpo_beta * (ratio[:, :1] - ratio[:, 1:])
        preference = -F.logsigmoid(margin).mean()
        loss = preference
    else:  # orpo
        log_odds = (chosen[:, None] - rejected) - (_log1m_exp(chosen)[:, None] - _log1m_exp(rejected))
        margin = log_odds
        preference = -F.logsigmoid(log_odds).mean()
        loss = nll + config.orpo_weight * preference

    metrics = {
        "loss": loss.item(),
        "preference_loss": preference.item(),
        "nll_chosen": nll.item(),
        "logp_chosen": chosen.mean().item(),
        "logp_rejected": rejected.mean().item(),
        "margin": margin.float().mean().item(),
        "accuracy": (chosen[:, None] > rejected).float().mean().item(),
    }
    return loss, metrics
