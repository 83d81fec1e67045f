"""Fixed-step, differentiable ODE steppers shared by the physics priors.

A prior advances every sample of a batch by the same physical step ``dt`` with its own
parameters, so a fixed-step method is the right tool: the cost is known in advance, there is
no step-size control to synchronise across the batch, and autograd sees plain tensor
arithmetic (no adjoint needed for one step).

    y1 = rk4(f, y0, dt, substeps=4)               # autonomous: f(y) -> dy/dt
    y1 = rk4(f, y0, dt, substeps=4, t0=t)         # non-autonomous: f(t, y), t0 (B,) or scalar

Classical RK4 is stable for h·λ inside a region reaching |hλ| ≈ 2.8 on both the imaginary
and the negative real axis; callers pick `substeps` so that h = dt / substeps keeps
h·ρ(∂f/∂y) well inside it (see `priors/ode.py`). Explicit Euler is offered for ablations
only: it is unstable on every undamped oscillator whatever the step (|1 + ihω| > 1).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Field = Callable[..., Tensor]


def _stage_field(f: Field, t0: Tensor | float | None) -> tuple[Field, Tensor | float]:
    if t0 is None:
        return (lambda t, y: f(y)), 0.0
    return f, t0


def _check(dt: float, substeps: int) -> None:
    if not isinstance(substeps, int) or isinstance(substeps, bool) or substeps < 1:
        raise ValueError(f"substeps must be an integer >= 1; got {substeps!r}")
    if not dt == dt:  # NaN
        raise ValueError(f"dt must be a finite float; got {dt!r}")


def rk4(
    f: Field, y: Tensor, dt: float, substeps: int = 1, *, t0: Tensor | float | None = None
) -> Tensor:
    """Advance `y` by `dt` with `substeps` classical Runge-Kutta 4 steps of size dt/substeps.

    Args:
        f: vector field, ``f(y) -> dy/dt`` (or ``f(t, y)`` when `t0` is given), same shape as y.
        y: state ``(..., state)``.
        dt: total step (float; may be negative to integrate backwards).
        substeps: number of equal RK4 steps.
        t0: start time; a tensor broadcastable to ``y[..., 0]`` or a float. None: f is autonomous.

    Returns:
        The state at t0 + dt, shape of `y`; local error O((dt/substeps)^5) per substep.
    """
    _check(dt, substeps)
    field, t = _stage_field(f, t0)
    h = dt / substeps
    for _ in range(substeps):
        k1 = field(t, y)
        k2 = field(t + h / 2, y + (h / 2) * k1)
        k3 = field(t + h / 2, y + (h / 2) * k2)
        k4 = field(t + h, y + h * k3)
        y = y + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        t = t + h
    return y


def euler(
    f: Field, y: Tensor, dt: float, substeps: int = 1, *, t0: Tensor | float | None = None
) -> Tensor:
    """Advance `y` by `dt` with `substeps` explicit Euler steps (the paper's draft; ablations)."""
    _check(dt, substeps)
    field, t = _stage_field(f, t0)
    h = dt / substeps
    for _ in range(substeps):
        y = y + h * field(t, y)
        t = t + h
    return y


INTEGRATORS: dict[str, Callable[..., Tensor]] = {"rk4": rk4, "euler": euler}
