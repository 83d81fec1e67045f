"""Batched integration of a `System` over trajectories with per-trajectory parameters."""

from __future__ import annotations

import torch
import torchdiffeq
from torch import Tensor

from warp_phys.errors import DivergenceError, UserError
from warp_phys.system import System

DEFAULT_METHOD = "dopri5"
DEFAULT_RTOL = 1e-8
DEFAULT_ATOL = 1e-8


def simulate(
    system: System,
    y0: Tensor,
    params: Tensor,
    ts: Tensor,
    *,
    method: str = DEFAULT_METHOD,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    index_offset: int = 0,
) -> Tensor:
    """Integrate `system` from ``y0 (B, S)`` with ``params (B, P)``, saved at ``ts (T,)``.

    Returns ``(B, T, S)`` in the dtype of `y0` (float64 for data generation). Raises
    `DivergenceError` naming the first trajectory (numbered from `index_offset`) that
    reaches NaN or inf.
    """
    B, S = y0.shape
    if S != system.state_dim:
        raise UserError(
            f"y0 must have {system.state_dim} states for {system.name!r}; got shape {tuple(y0.shape)}"
        )
    pview = system.view(params)

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        return system.vector_field(t, y, pview)

    probe = rhs(ts[0], y0)
    if probe.shape != y0.shape:
        raise UserError(
            f"vector field of system {system.name!r} returned shape {tuple(probe.shape)} for "
            f"y of shape {tuple(y0.shape)}; it must return dy/dt with the shape of y"
        )
    ys = torchdiffeq.odeint(rhs, y0, ts, method=method, rtol=rtol, atol=atol)  # (T, B, S)
    ys = ys.transpose(0, 1).contiguous()  # (B, T, S): the one place time-first becomes batch-first
    check_finite(system, ys, params, ts, index_offset=index_offset)
    return ys


def check_finite(system: System, ys: Tensor, params: Tensor, ts: Tensor, *, index_offset: int = 0) -> None:
    """Raise `DivergenceError` for the first trajectory of ``ys (B, T, S)`` that is not finite."""
    bad = ~torch.isfinite(ys).all(dim=-1)  # (B, T)
    if not bad.any():
        return
    b = int(bad.any(dim=1).nonzero()[0])
    t = float(ts[int(bad[b].nonzero()[0])])
    values = ", ".join(f"{n}={float(v):.6g}" for n, v in zip(system.param_names, params[b], strict=True))
    raise DivergenceError(
        f"system {system.name!r} diverged: trajectory {b + index_offset} ({values}) is not finite "
        f"at t={t:.6g}; narrow the parameter ranges or the time span"
    )
