"""Black-box root: the paper's MLP on τ or [τ, y_prev] (vanilla WARP).

    mean[, std] = MLP_θ(τ)          inputs = "tau"
    mean[, std] = MLP_θ(τ, y_prev)  inputs = "tau_y"
    mean = y_prev + MLP_θ(...)      residual = True (the increment; persistence at init)

`depth` hidden layers of `width` units (the paper's MSD root: width 48, depth 3, inputs "tau",
residual false, so 1 -> 48 -> 48 -> 48 -> 2 and Dθ = 4,898). The defaults are sized for a CPU
and chosen by measurement (README, "Vanilla WARP on a CPU"): width 16, depth 2, inputs
[τ, y_prev], residual: 3 -> 16 -> 16 -> S, Dθ = 370 for S = 2, learning per step several
times faster than the paper's root and each step 3x cheaper. With `predict_std` the last layer has 2S outputs,
the std being max(softplus(·), 1e-4); `clip` bounds the mean to [-clip, clip] (the paper
uses 38 on MSD; "none": no bound). The default, "auto", is `AUTO_CLIP` standard deviations when the model
standardizes the data (the default, `model.normalize`) and no bound otherwise: a free-running
forecast that leaves the data's range by that much is already wrong, and without the bound it
fed back into itself until it overflowed (Lotka-Volterra, at the switch to autoregressive
training: every later batch non-finite, training stopped). Weights are flat in torch.nn.Linear
layout (`warp_phys.root.FlatMLP`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from warp_phys.errors import UserError
from warp_phys.root import AbstractRoot, FlatMLP, register_prior
from warp_phys.system import System

ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "softplus": F.softplus,
}
INPUTS = ("tau", "tau_y")
STD_FLOOR = 1e-4  # lower bound of the predicted std, as in the paper's code
AUTO_CLIP = 10.0  # clip="auto": the bound of the mean in standard deviations of the data


@register_prior("blackbox")
class BlackBoxRoot(AbstractRoot):
    """MLP root network with per-sample flat weights."""

    def __init__(
        self,
        *,
        state_dim: int,
        system: System | None = None,
        width: int = 16,  # CPU-sized; the paper's MSD root is 48 x 3 (runs/msd_paper.toml)
        depth: int = 2,
        inputs: str = "tau_y",  # the paper's optional [τ, y_prev]; "tau" for τ alone
        activation: str = "silu",
        predict_std: bool = False,
        clip: float | str | None = "auto",
        residual: bool = True,  # predict the increment (the paper predicts y itself)
    ) -> None:
        super().__init__()
        if inputs not in INPUTS:
            raise UserError(
                f"blackbox option inputs must be one of {', '.join(INPUTS)}; got {inputs!r}"
            )
        if activation not in ACTIVATIONS:
            raise UserError(
                f"blackbox option activation must be one of {', '.join(ACTIVATIONS)}; "
                f"got {activation!r}"
            )
        if width < 1 or depth < 0:
            raise UserError(
                f"blackbox needs width >= 1 and depth >= 0; got width={width}, depth={depth}"
            )
        if clip == "none":  # TOML has no null
            clip = None
        number = isinstance(clip, int | float) and not isinstance(clip, bool)
        if clip != "auto" and clip is not None and not (number and clip > 0):
            raise UserError(
                f"blackbox option clip must be a positive number, 'auto' or 'none'; got {clip!r}"
            )
        self.state_dim = state_dim
        self.input_kind = inputs
        self.residual = bool(residual)
        self.activation = ACTIVATIONS[activation]
        self.predict_std = predict_std
        self.clip = clip
        n_in = 1 + (state_dim if inputs == "tau_y" else 0)
        n_out = state_dim * (2 if predict_std else 1)
        self.mlp = FlatMLP([n_in, *([width] * depth), n_out])
        self.n_weights = self.mlp.n_weights

    def init_weights(self, generator: torch.Generator | None = None) -> Tensor:
        theta = self.mlp.init(generator)
        if self.residual:  # last layer zero: the untrained model is the persistence forecast
            theta[theta.numel() - self.mlp.shapes[-1][0] * (self.mlp.shapes[-1][1] + 1) :] = 0.0
        return theta

    def bound(self) -> float | None:
        """The bound of the mean, `clip` with "auto" resolved (see the module docstring)."""
        if self.clip == "auto":
            return AUTO_CLIP if self.standardized else None
        return self.clip

    def forward(
        self, theta: Tensor, tau: Tensor, y_prev: Tensor, dt: float
    ) -> tuple[Tensor, Tensor | None]:
        x = tau.unsqueeze(-1).to(theta.dtype)  # (B, 1)
        if self.input_kind == "tau_y":
            x = torch.cat((x, y_prev.to(theta.dtype)), -1)  # (B, 1 + S)
        out = self.mlp(theta, x, self.activation)  # (B, S) or (B, 2S)
        S = self.state_dim
        mean = out[:, :S]
        if self.residual:  # predict the increment: persistence when the output is 0
            mean = y_prev.to(theta.dtype) + mean
        clip = self.bound()
        if clip is not None:
            mean = mean.clamp(-clip, clip)
        if not self.predict_std:
            return mean, None
        return mean, F.softplus(out[:, S:]).clamp_min(STD_FLOOR)
