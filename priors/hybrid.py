"""Hybrid root: known but incomplete physics plus a small neural residual (APHYNITY-style).

    dy/dt = f_known(t, y; p(θ)) + r(y; θ),      ŷ_{t+1} = RK4_{Δt}(dy/dt; y_t)

`f_known` is a registered system with some parameters dropped (forced to zero, e.g. the
damping c of msd) or held at values that may be wrong (`fixed`); the others are learned and
soft-bounded as in the `ode` prior. The residual r is an MLP on y (in `state_scale` units)
whose weights are also part of θ, so WARP adapts it per trajectory. It is bounded:

    r_i(y) = F_i · β · tanh(g_i(y / scale) / β),    F_i = scale_i · rate

with `rate` the largest |f_j| / scale_j along the system's reference trajectories (a
characteristic 1/time) and β = `residual_bound`; the residual can at most match the size of
the full field, which keeps RK4 finite at any θ. As in APHYNITY (Yin et al., ICLR 2021), the
training loss adds λ · `penalty(theta, tau, y_prev)`, the mean squared residual in units of
F at y_prev: summed over a sequence, the norm of the residual along the trajectory. The
residual starts at zero (last layer zero), so training begins from the known physics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from warp_phys.bounded import (
    DEFAULT_SPREAD,
    BoundedParams,
    Stepper,
    box_points,
    check_field,
    state_scale_of,
    std_from,
)
from warp_phys.errors import UserError
from warp_phys.physics import check_grid, reference, resolve_system, spectral_radius, time_map
from warp_phys.root import AbstractRoot, FlatMLP, register_prior
from warp_phys.system import System, system_names


@register_prior("hybrid")
class HybridRoot(AbstractRoot):
    """Root network = incomplete system ODE (parameters from θ) + bounded residual (from θ)."""

    physical_units = True  # the model feeds it raw states (no standardisation)

    def __init__(
        self,
        *,
        state_dim: int,
        system: System | None = None,
        system_name: str | None = None,  # a registered system; wins over `system` when given
        drop: Sequence[str] = (),  # parameters forced to zero (the missing physics)
        learn: Sequence[str] | None = None,  # default: ranged parameters not dropped or fixed
        fixed: Mapping[str, float] | None = None,  # held values (possibly wrong on purpose)
        inputs: str = "const",  # parameter-network input: "const", "tau" or "tau_y"
        width: int = 32,  # parameter-network hidden width
        depth: int = 1,  # parameter-network hidden layers
        residual_width: int = 16,  # residual MLP hidden width
        residual_depth: int = 1,  # residual MLP hidden layers
        residual_bound: float = 1.0,  # β: residual at most β times the field's size
        substeps: int | str = "auto",  # RK4 substeps per Δt; "auto": h·ρ(∂f_known/∂y) <= 1
        spread: float | Mapping[str, float] = DEFAULT_SPREAD,  # bound radius, log units if > 0
        state_scale: str | Sequence[float] | None = "auto",  # y units seen by the networks
        integrator: str = "rk4",  # "rk4" or "euler" (ablation)
        predict_std: bool = False,  # also output a std per state (Gaussian NLL loss)
    ) -> None:
        super().__init__()
        if system is None and system_name is None:
            raise UserError(
                "hybrid prior needs at least one known term; got no system: pass system_name= "
                f"(registered systems: {', '.join(system_names())}) or use the blackbox prior"
            )
        self.system = resolve_system(
            "hybrid", state_dim=state_dim, system=system, system_name=system_name
        )
        names = self.system.param_names
        if names and set(drop) >= set(names):
            raise UserError(
                f"hybrid prior needs at least one known term; drop={list(drop)} removes every "
                f"parameter of {self.system.name!r}: keep one, or use the blackbox prior"
            )
        ok = isinstance(residual_width, int) and isinstance(residual_depth, int)
        if not (ok and residual_width >= 1 and residual_depth >= 0):
            raise UserError(
                f"prior 'hybrid': residual_width must be >= 1 and residual_depth >= 0; "
                f"got {residual_width!r}, {residual_depth!r}"
            )
        if not (isinstance(residual_bound, int | float) and residual_bound > 0):
            raise UserError(f"prior 'hybrid': residual_bound must be > 0; got {residual_bound!r}")
        scale = state_scale_of(self.system, state_scale)
        self.params = BoundedParams(
            self.system, prior="hybrid", learn=learn, fixed=fixed, drop=drop, inputs=inputs,
            width=width, depth=depth, spread=spread, state_scale=scale,
            n_extra=state_dim * predict_std,
        )  # fmt: skip
        held = f"drop={list(drop)}" + (f" and fixed={dict(fixed)}" if fixed else "")
        check_field(self.system, "hybrid", self.params, held)
        self._check_known_terms(drop)
        rho = None
        if substeps == "auto":
            rho = spectral_radius(self.system, reference(self.system), box_points(self.params))
        self.stepper = Stepper(prior="hybrid", integrator=integrator, substeps=substeps, rho=rho)
        ref = reference(self.system)
        self.register_buffer("scale", scale.float(), persistent=False)  # (S,)
        self.register_buffer("size", (scale * ref.rate).float(), persistent=False)  # (S,) F
        self.bound = float(residual_bound)
        self.residual = FlatMLP([state_dim, *[residual_width] * residual_depth, state_dim])
        self.n_params = self.params.n_weights
        self.n_weights = self.n_params + self.residual.n_weights
        self.t_start, self.t_length = time_map(self.system)

    def _check_known_terms(self, drop: Sequence[str]) -> None:
        """Raise when the reduced field is zero at every reference state (nothing is known)."""
        ref = reference(self.system)
        p = self.params.centre_values().expand(len(ref.t), -1)  # (N, P)
        if not self.system.f(ref.t, ref.y, p).abs().gt(0).any():
            raise UserError(
                f"hybrid prior needs at least one known term; with drop={list(drop)} the vector "
                f"field of {self.system.name!r} is zero everywhere: drop fewer parameters"
            )

    def learned_names(self) -> tuple[str, ...]:
        """Names of the parameters read from θ (the others are held or dropped)."""
        return self.params.learn

    def check_steps(self, n_steps: int) -> None:
        check_grid(self.system, "hybrid", n_steps)

    def init_weights(self, generator: torch.Generator | None = None) -> Tensor:
        r = self.residual.init(generator)
        last = self.system.state_dim * (self.residual.sizes[-2] + 1)
        r[r.numel() - last :] = 0.0  # residual starts at zero: pure known physics
        return torch.cat((self.params.init(generator), r))

    def residual_field(self, theta: Tensor, y: Tensor) -> Tensor:
        """Return the bounded residual r(y) ``(B, S)`` with the residual weights of θ."""
        w = theta[:, self.n_params :]  # (B, n_residual)
        g = self.residual(w, y / self.scale.to(y))  # (B, S)
        return self.size.to(y) * self.bound * torch.tanh(g / self.bound)

    def forward(
        self, theta: Tensor, tau: Tensor, y_prev: Tensor, dt: float
    ) -> tuple[Tensor, Tensor | None]:
        p, extra = self.params(theta[:, : self.n_params], tau, y_prev)  # (B, P), (B, S or 0)
        t0 = self.t_start + tau.to(y_prev) * self.t_length - dt  # (B,) physical time of y_prev

        def field(t: Tensor, y: Tensor) -> Tensor:
            return self.system.f(t, y, p) + self.residual_field(theta, y)

        return self.stepper(field, y_prev, dt, t0), std_from(extra, self.scale)

    def penalty(self, theta: Tensor, tau: Tensor, y_prev: Tensor) -> Tensor:
        """Return the mean squared residual at y_prev in units of the field size, ``(B,)``."""
        return (self.residual_field(theta, y_prev) / self.size.to(y_prev)).square().mean(-1)

    def physical_params(self, theta: Tensor, tau: Tensor, y_prev: Tensor) -> dict[str, Tensor]:
        p, _ = self.params(theta[:, : self.n_params], tau, y_prev)  # (B, P); dropped: 0
        return dict(zip(self.system.param_names, p.unbind(-1), strict=True))
