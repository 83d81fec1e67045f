"""ODE-structured root (physics-informed WARP): θ -> a registered system's parameters -> RK4.

θ holds the flat weights of a small MLP whose outputs are the unknown physical parameters of
a registered system, soft-bounded around prior values taken from the declared ranges:

    positive p:  p = c · exp(s · tanh(r)),    c = geometric mean of the train range
    signed p:    p = c + w · s · tanh(r),     c = midpoint, w = half-width of the range

(r the raw network output, s = `spread`). The next state is the system's own vector field
integrated from y_prev over Δt by fixed-step RK4 with substeps:

    ŷ_{t+1} = RK4_{Δt}( y ↦ f(t, y, p(θ_t)) ; y_t )

Stability (the paper's explicit-Euler draft produced NaNs, with unbounded ReLU parameters):
the parameters cannot leave their soft bounds, and with ``substeps="auto"`` the RK4 step
h = Δt / substeps keeps h·ρ <= 1, where ρ is the largest |eigenvalue| of ∂f/∂y over the
corners of the bounded parameter box and states along reference trajectories (the system's
default parameters from its initial-state distribution). RK4's stability region reaches
|hλ| ≈ 2.8 on both the imaginary and the negative real axis, so this is a margin of ~2.8 at
the worst reachable parameters (far more at the usual ones). Example, msd with m, k, c
learned and spread 2: k/m <= 283·e^4, ρ ≈ 124 /s, Δt = 1/255 s: one substep.
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
from warp_phys.root import AbstractRoot, register_prior
from warp_phys.system import System


@register_prior("ode")
class ODERoot(AbstractRoot):
    """Root network = a registered system's ODE with parameters read from θ (WARP-Phys).

    root = build_root("ode", state_dim=2, system=get_system("msd"), fixed={"m": 0.03})
    mean, std = root(theta, tau, y_prev, dt)         # one RK4 step of the MSD
    root.physical_params(theta, tau, y_prev)         # {"m": ..., "k": ..., "c": ...}
    """

    physical_units = True  # the model feeds it raw states (no standardisation)

    def __init__(
        self,
        *,
        state_dim: int,
        system: System | None = None,
        system_name: str | None = None,  # a registered system; wins over `system` when given
        learn: Sequence[str] | None = None,  # default: every parameter with a train range
        fixed: Mapping[str, float] | None = None,  # held values; default: system defaults
        inputs: str = "const",  # parameter-network input: "const", "tau" or "tau_y"
        width: int = 32,  # parameter-network hidden width
        depth: int = 1,  # parameter-network hidden layers (0: affine)
        substeps: int | str = "auto",  # RK4 substeps per Δt; "auto": h·ρ(∂f/∂y) <= 1
        spread: float | Mapping[str, float] = DEFAULT_SPREAD,  # bound radius, log units if > 0
        state_scale: str | Sequence[float] | None = "auto",  # y units seen by the network
        integrator: str = "rk4",  # "rk4" or "euler" (ablation)
        predict_std: bool = False,  # also output a std per state (Gaussian NLL loss)
    ) -> None:
        super().__init__()
        self.system = resolve_system(
            "ode", state_dim=state_dim, system=system, system_name=system_name
        )
        scale = state_scale_of(self.system, state_scale)
        self.params = BoundedParams(
            self.system, prior="ode", learn=learn, fixed=fixed, inputs=inputs, width=width,
            depth=depth, spread=spread, state_scale=scale, n_extra=state_dim * predict_std,
        )  # fmt: skip
        if not self.params.learn:
            raise UserError(
                f"prior 'ode' for {self.system.name!r} has nothing to learn (learn is empty); "
                f"name parameters in learn= or use a system with sampled parameters"
            )
        check_field(self.system, "ode", self.params, "these parameter values")
        rho = None
        if substeps == "auto":
            rho = spectral_radius(self.system, reference(self.system), box_points(self.params))
        self.stepper = Stepper(prior="ode", integrator=integrator, substeps=substeps, rho=rho)
        self.t_start, self.t_length = time_map(self.system)
        self.n_weights = self.params.n_weights

    def learned_names(self) -> tuple[str, ...]:
        """Names of the parameters read from θ (the others are held or dropped)."""
        return self.params.learn

    def check_steps(self, n_steps: int) -> None:
        check_grid(self.system, "ode", n_steps)

    def init_weights(self, generator: torch.Generator | None = None) -> Tensor:
        return self.params.init(generator)

    def weights_for(self, values: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return θ ``(B, n_weights)`` that encodes the parameters ``values (B, P)``."""
        return self.params.weights_for(values, generator)

    def forward(
        self, theta: Tensor, tau: Tensor, y_prev: Tensor, dt: float
    ) -> tuple[Tensor, Tensor | None]:
        p, extra = self.params(theta, tau, y_prev)  # (B, P), (B, S or 0)
        t0 = self.t_start + tau.to(y_prev) * self.t_length - dt  # (B,) physical time of y_prev
        mean = self.stepper(lambda t, y: self.system.f(t, y, p), y_prev, dt, t0)
        return mean, std_from(extra, self.params.scale)

    def physical_params(self, theta: Tensor, tau: Tensor, y_prev: Tensor) -> dict[str, Tensor]:
        p, _ = self.params(theta, tau, y_prev)  # (B, P)
        return dict(zip(self.system.param_names, p.unbind(-1), strict=True))
