"""The forecaster interface every model implements (WARP, GRU, LSTM, the standardising wrapper).

    out = model(ys, context=L)              # Forecast(mean (B, T-1, S), std or None)
    out = model(ys, context=L, teacher_prob=0.5, generator=g, horizon=H)
    model.physical_params(ys, L)            # {name: (B, T-1)}; {} for black boxes
    model.penalty(ys)                       # (B, T-1) or None
    model.learned_names()                   # physical parameters a physics model estimates

Index t of a forecast predicts ys[:, t + 1]. The value fed at step t is ys[:, t] for t <
context, else (per sample, with probability `teacher_prob`) ys[:, t], else the model's own
previous mean. context >= T - 1 is fully teacher-forced. With `horizon`, a forecast stops
`horizon` steps after the context (predictions of ys[:, 1 : context + horizon]); normalised
time τ keeps the whole sequence's scale, τ_{t+1} = (t + 1) / (T - 1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Forecast(NamedTuple):
    """Predictions of ys[:, 1:]: mean ``(B, T-1, S)``, std ``(B, T-1, S)`` or None."""

    mean: Tensor
    std: Tensor | None


class AbstractForecaster(nn.Module, ABC):
    """A sequence forecaster behind the interface of the module docstring."""

    state_dim: int

    @abstractmethod
    def forward(
        self,
        ys: Tensor,
        *,
        context: int,
        teacher_prob: float = 0.0,
        generator: torch.Generator | None = None,
        horizon: int | None = None,
    ) -> Forecast:
        """Predict ys[:, 1:] from ys ``(B, T, S)`` (see the module docstring)."""

    def physical_params(self, ys: Tensor, context: int) -> dict[str, Tensor]:
        """Return physical parameters read along the rollout, each ``(B, T-1)`` ({} here)."""
        return {}

    def penalty(self, ys: Tensor) -> Tensor | None:
        """Return a per-step penalty ``(B, T-1)`` added to the loss, or None (none here)."""
        return None

    def learned_names(self) -> tuple[str, ...] | None:
        """Names of the physical parameters this model estimates (None: every one it reports)."""
        return None

    def n_params(self) -> int:
        """Return the number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def feed_mask(
    n: int, p: float, generator: torch.Generator | None, device: torch.device
) -> Tensor | bool:
    """Return which of n samples are fed the truth at a forecast step: a mask ``(n,)``, or
    True / False for all of them (no random draw when p is 1 or 0)."""
    if p <= 0:
        return False
    if p >= 1:
        return True
    dev = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=dev).to(device) < p  # (n,)


def select(mask: Tensor | bool, truth: Tensor, own: Tensor) -> Tensor:
    """Return truth where `mask` (per sample), own elsewhere, ``(B, S)``."""
    if mask is True:
        return truth
    if mask is False:
        return own
    return torch.where(mask.unsqueeze(-1), truth, own)


def feed(truth: Tensor, own: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Return the value fed at a forecast step ``(B, S)``: the own prediction, or per sample
    with probability p the truth (no random draw when p is 0 or 1)."""
    return select(feed_mask(truth.shape[0], p, generator, truth.device), truth, own)
