"""Closed-form root for the paper's sine task: ŷ(τ) = sin(2π t(τ) + φ̂(τ)).

t(τ) = t_start + τ (t_end − t_start) is the physical time of the predicted step (the
system's time span; [0, 1] without a system, as in the paper). The phase φ̂ comes from a
small MLP on τ whose flat weights are θ (Nzoyem et al. 2025, sine data-efficiency task:
"sin(2πτ + φ̂), the phase from the root network"). The last layer starts at zero, so the
initial weights predict sin(2πt), the centre of the phase range. The prediction does not
use y_prev: the whole trajectory is read from θ.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from warp_phys.errors import UserError
from warp_phys.physics import check_grid
from warp_phys.root import AbstractRoot, FlatMLP, register_prior
from warp_phys.system import System


@register_prior("sine")
class SineRoot(AbstractRoot):
    """Root network = a sinusoid of period 1 whose phase is an MLP of τ."""

    physical_units = True  # predicts the raw signal (no standardisation)

    def __init__(
        self,
        *,
        state_dim: int,
        system: System | None = None,
        width: int = 32,  # phase-network hidden width
        depth: int = 1,  # phase-network hidden layers (0: affine in τ)
    ) -> None:
        super().__init__()
        if state_dim != 1:
            raise UserError(
                f"prior 'sine' predicts one state but the dataset has {state_dim}; use it on a "
                f"one-state system such as 'sine', or the 'ode' or 'blackbox' prior"
            )
        if not (isinstance(width, int) and width >= 1 and isinstance(depth, int) and depth >= 0):
            raise UserError(
                f"prior 'sine': width must be >= 1 and depth >= 0; got {width}, {depth}"
            )
        self.system = system
        t_span = system.t_span if system is not None else (0.0, 1.0)
        self.t_start, self.t_length = float(t_span[0]), float(t_span[1] - t_span[0])
        self.mlp = FlatMLP([1, *[width] * depth, 1])
        self.n_weights = self.mlp.n_weights

    def check_steps(self, n_steps: int) -> None:
        if self.system is not None:  # τ maps onto the system's time span
            check_grid(self.system, "sine", n_steps)

    def init_weights(self, generator: torch.Generator | None = None) -> Tensor:
        theta = self.mlp.init(generator)
        theta[theta.numel() - (self.mlp.sizes[-2] + 1) :] = 0.0  # φ̂ = 0 at init
        return theta

    def phase(self, theta: Tensor, tau: Tensor) -> Tensor:
        """Return φ̂(τ) ``(B, 1)`` (unwrapped)."""
        return self.mlp(theta, tau.to(theta).reshape(-1, 1))  # (B, 1)

    def forward(self, theta: Tensor, tau: Tensor, y_prev: Tensor, dt: float) -> tuple[Tensor, None]:
        t = self.t_start + tau.to(theta).reshape(-1, 1) * self.t_length  # (B, 1)
        return torch.sin(2 * math.pi * t + self.phase(theta, tau)).to(y_prev), None

    def physical_params(self, theta: Tensor, tau: Tensor, y_prev: Tensor) -> dict[str, Tensor]:
        phi = self.phase(theta, tau)[:, 0]  # (B,)
        return {"phase": torch.atan2(torch.sin(phi), torch.cos(phi))}  # wrapped to (-π, π]
