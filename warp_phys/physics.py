"""Physics helpers shared by the library and the physics priors: time map, reference states,
spectral radius of the vector field (what fixes a stable RK4 substep count).

    ref = reference(system)           # default-parameter trajectories: scale and rate
    rho = spectral_radius(system, ref, params)   # max |eig ∂f/∂y| over ref states x params
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from warp_phys.errors import UserError
from warp_phys.simulate import simulate
from warp_phys.system import Box, System, get_system, system_names

N_REFERENCE_TIMES = 65  # saved points per reference trajectory


def resolve_system(
    prior: str, *, state_dim: int, system: System | None, system_name: str | None
) -> System:
    """Return the prior's system: `system_name` when given (it wins), else `system`."""
    if system_name is not None:
        system = get_system(system_name)  # UserError listing the registered names
    if system is None:
        raise UserError(
            f"prior {prior!r} needs a system: pass system_name= (registered systems: "
            f"{', '.join(system_names())})"
        )
    system.check_differentiable(f"prior {prior!r}")
    if system.state_dim != state_dim:
        raise UserError(
            f"prior {prior!r} for system {system.name!r} has {system.state_dim} states "
            f"({', '.join(system.state)}) but the dataset has {state_dim}; use the system the "
            f"dataset was generated with (store attribute 'system') or one with {state_dim} states"
        )
    return system


def check_grid(system: System, prior: str, n_steps: int) -> None:
    """Raise unless a sequence of `n_steps` states is the system's whole saved grid: physics
    priors map the normalised time τ in [0, 1] of a sequence onto the system's time span."""
    if n_steps != system.n_steps:
        raise UserError(
            f"prior {prior!r} maps τ onto the time grid of {system.name!r} ({system.n_steps} "
            f"steps) but got a sequence of {n_steps}: pass whole trajectories and limit what is "
            f"fed and forecast with context= and horizon="
        )


def time_map(system: System) -> tuple[float, float]:
    """Return (t_start, t_length): physical time t = t_start + τ · t_length."""
    return float(system.t_span[0]), float(system.t_span[1] - system.t_span[0])


@dataclass(frozen=True)
class Reference:
    """States along a few trajectories at default parameters: a system's notion of scale."""

    t: Tensor  # (N,) float64
    y: Tensor  # (N, S) float64
    scale: Tensor  # (S,) max |y| per state (1 where the state stays at 0)
    rate: float  # max_j |f_j| / scale_j over the states: a characteristic 1/time


_REFERENCES: dict[tuple, Reference] = {}


def reference(system: System) -> Reference:
    """Simulate default-parameter trajectories (y0 low/centre/high), 65 points each; cached."""
    key = (type(system), tuple(system.params.items()), system.t_span)
    if key not in _REFERENCES:
        ic = system.y0
        corners = [ic.low, ic.values, ic.high] if isinstance(ic, Box) else [ic.values]
        y0 = np.asarray(corners, dtype=np.float64)  # (n, S)
        params = np.broadcast_to(system.default_params().numpy(), (len(y0), len(system.params)))
        y0 = torch.as_tensor(system.initial_state(y0, params))
        ts = torch.linspace(*system.t_span, N_REFERENCE_TIMES, dtype=torch.float64)
        ys = simulate(system, y0, torch.as_tensor(params.copy()), ts, rtol=1e-4, atol=1e-6)
        t = ts.repeat(ys.shape[0])  # (N,)
        y = ys.reshape(-1, system.state_dim)  # (N, S)
        p = system.default_params().expand(len(t), -1)  # (N, P)
        scale = y.abs().amax(0)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        rate = float((system.f(t, y, p).abs() / scale).amax()) or 1.0 / float(ts[-1] - ts[0])
        _REFERENCES[key] = Reference(t=t, y=y, scale=scale, rate=rate)
    return _REFERENCES[key]


def spectral_radius(
    system: System,
    ref: Reference,
    params: Tensor,
    jacobian: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> float:
    """Return max |eig ∂f/∂y| over reference states × parameter vectors ``params (C, P)``.

    `jacobian(t (N,), y (N, S), params (N, P)) -> (N, S, S)` defaults to `System.jacobian`;
    a caller whose field is parametrised differently (e.g. by coefficients) passes its own.
    """
    C, N = params.shape[0], ref.t.shape[0]
    t = ref.t.repeat(C)  # (C·N,)
    y = ref.y.repeat(C, 1)  # (C·N, S)
    p = params.repeat_interleave(N, dim=0)  # (C·N, P)
    if jacobian is None:
        jac = system.jacobian(t, y, system.view(p)).detach()  # (C·N, S, S)
    else:
        jac = jacobian(t, y, p)
    if not torch.isfinite(jac).all():
        raise UserError(
            f"the Jacobian of system {system.name!r} is not finite at the prior's parameter "
            f"bounds; narrow `spread` or fix the parameter that reaches a singular value"
        )
    return float(torch.linalg.eigvals(jac).abs().amax())
