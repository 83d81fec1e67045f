"""Batched integration of a `System` over trajectories with per-trajectory parameters.

The default integrator, ``"dop853"`` (`dop853.py`), is Hairer's DOP853 (explicit Runge-Kutta
8(5,3) with its 7th-order continuous extension; Hairer, Norsett & Wanner, *Solving ODEs I*,
sec. II.10) with the rules of scipy's ``solve_ivp(method="DOP853")`` (initial step, error
norm, step factors), vectorised over trajectories in torch. Every trajectory keeps its own
clock, step size and accept/reject decision, so the batch never marches at its hardest
member's pace, and the saved grid is read off the dense output without shortening any step.

Bitwise reproducibility: every floating-point operation is elementwise over trajectories
(stage sums accumulate in stage order, the error norm is an explicit sum over the state:
never a reduction whose order could depend on the batch shape), ops run single-threaded,
and each batch is padded to a whole number of SIMD blocks so that every lane of every op,
ours and the vector field's, runs the same vectorised code. One trajectory's bytes
therefore do not depend on which trajectories share its batch: a store written in chunks of
any size holds the same numbers. (They may differ between machines and torch versions.)

Speed: one Python-level op covers the whole batch, so the per-step cost is a few hundred
tensor ops whatever the batch; large batches are split between forked worker processes
(`workers.py`).

``method="torchdiffeq:<name>"`` (e.g. ``"torchdiffeq:dopri5"``) integrates with torchdiffeq
instead: one step size shared by the whole batch, so results depend on the batch.
"""

from __future__ import annotations

import math
import numbers
import sys
from contextlib import contextmanager

import torch
from torch import Tensor

from warp_phys.dop853 import _dop853, _Stuck
from warp_phys.errors import DivergenceError, UserError
from warp_phys.system import System
from warp_phys.workers import _Child, default_workers

DEFAULT_METHOD = "dop853"
DEFAULT_RTOL = 1e-8
DEFAULT_ATOL = 1e-8
MAX_TOLERANCE = 1e-2  # loosest rtol/atol accepted for stored data (`check_tolerances`)
TORCHDIFFEQ_PREFIX = "torchdiffeq:"
MIN_WORKER_BATCH = 1024  # trajectories per worker below which a second one does not pay
LANES = 64  # batches are padded to a multiple of this: >= 2 SIMD registers of float64 anywhere
_CAN_FORK = sys.platform == "linux"  # workers are forked processes; elsewhere one process


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
    workers: int | None = None,
) -> Tensor:
    """Integrate `system` from ``y0 (B, S)`` with ``params (B, P)``, saved at ``ts (T,)``.

    With the default method the vector field receives ``t`` as a ``(B,)`` tensor, each
    trajectory's own time (torchdiffeq passes a scalar tensor): write time-dependent fields so
    that ``t`` broadcasts like a parameter. No gradients flow through the default method.

    Args:
        system: the system to integrate.
        y0: initial states at ``ts[0]``, ``(B, S)``; its dtype (float64 for data) is kept.
        params: one parameter vector per trajectory, ``(B, P)``.
        ts: strictly increasing save times, ``(T,)``; integration starts at ``ts[0]``.
        method: ``"dop853"`` (default) or ``"torchdiffeq:<solver>"``.
        rtol: relative tolerance.
        atol: absolute tolerance.
        index_offset: added to trajectory indices in error messages (the chunk's start).
        workers: processes, each integrating a contiguous slice of at least `MIN_WORKER_BATCH`
            trajectories (Linux, forked; default `default_workers()`, the idle cores). The
            result does not depend on it.

    Returns:
        ``(B, T, S)`` states, batch first.

    Raises:
        DivergenceError: a trajectory reaches inf/NaN or its step size collapses.
        UserError: bad shapes or options, or a vector field that returns the wrong shape.
    """
    y0, params, ts = _check_inputs(system, y0, params, ts)
    integrator_attrs(method, rtol, atol)  # validates method and tolerances
    check_tolerances(rtol, atol)
    _check_tolerance(rtol, y0.dtype)
    if workers is not None and not (isinstance(workers, int) and workers >= 1):
        raise UserError(f"workers must be a positive integer or None (all cores); got {workers!r}")
    native = not method.startswith(TORCHDIFFEQ_PREFIX)
    _check_field(system, y0, params, ts[:1].expand(len(y0)) if native else ts[0])
    if native:
        ys = _dop853_batched(system, y0, params, ts, rtol, atol, index_offset, workers)
    else:
        name = method.removeprefix(TORCHDIFFEQ_PREFIX)
        ys = _torchdiffeq(system, y0, params, ts, name, rtol, atol)
    check_finite(system, ys, params, ts, index_offset=index_offset)
    return ys


def integrator_attrs(
    method: str, rtol: float, atol: float, *, dtype: torch.dtype = torch.float64
) -> dict:
    """Return a JSON-able description of the integrator, for store attributes."""
    for name, tol in (("rtol", rtol), ("atol", atol)):
        real = isinstance(tol, numbers.Real) and not isinstance(tol, bool)
        if not (real and math.isfinite(tol) and tol > 0):
            raise UserError(f"{name} must be a positive finite number; got {tol!r}")
    common = {"rtol": float(rtol), "atol": float(atol), "dtype": str(dtype).removeprefix("torch.")}
    if method == "dop853":
        return {
            "integrator": "warp_phys.simulate dop853",
            "method": method,
            "tableau": "DOP853: Dormand-Prince 8(5,3) (Hairer), 7th-order dense output",
            "step_control": "adaptive per trajectory, scipy solve_ivp rules",
            "batch_independent": True,
            "torch": torch.__version__,
            **common,
        }
    import torchdiffeq  # only here: it imports scipy.integrate, 0.6 s of every `generate`
    from torchdiffeq._impl.odeint import SOLVERS

    solvers = list(SOLVERS)
    name = method.removeprefix(TORCHDIFFEQ_PREFIX)
    if not method.startswith(TORCHDIFFEQ_PREFIX) or name not in solvers:
        raise UserError(
            f"unknown integration method {method!r}; use 'dop853' (the default) or "
            f"'{TORCHDIFFEQ_PREFIX}<name>' with <name> one of {', '.join(solvers)}"
        )
    return {
        "integrator": f"torchdiffeq {torchdiffeq.__version__}",
        "method": method,
        "tableau": name,
        "step_control": "one adaptive step size shared by the batch",
        "batch_independent": False,
        "torch": torch.__version__,
        **common,
    }


def check_finite(
    system: System, ys: Tensor, params: Tensor, ts: Tensor, *, index_offset: int = 0
) -> None:
    """Raise `DivergenceError` for the first trajectory of ``ys (B, T, S)`` that is not finite."""
    bad = ~torch.isfinite(ys).all(dim=-1)  # (B, T)
    if not bad.any():
        return
    b = int(bad.any(dim=1).nonzero()[0])
    t = float(ts[int(bad[b].nonzero()[0])])
    raise DivergenceError(
        f"system {system.name!r} diverged: trajectory {b + index_offset} "
        f"({_describe_params(system, params[b])}) is not finite at t={t:.6g}; "
        f"narrow the parameter ranges or the time span"
    )


# --- validation ------------------------------------------------------------------------------
def _check_inputs(system: System, y0, params, ts) -> tuple[Tensor, Tensor, Tensor]:
    if not (isinstance(y0, Tensor) and y0.is_floating_point() and y0.dim() == 2):
        raise UserError(f"y0 must be a floating-point tensor (batch, state); got {_shape(y0)}")
    B, S = y0.shape
    if S != system.state_dim:
        raise UserError(
            f"y0 must have {system.state_dim} states for {system.name!r}; "
            f"got shape {tuple(y0.shape)}"
        )
    P = len(system.param_names)
    if not (isinstance(params, Tensor) and tuple(params.shape) == (B, P)):
        raise UserError(
            f"params must be a tensor (batch, parameter) = ({B}, {P}) for {system.name!r} "
            f"({', '.join(system.param_names)}); got {_shape(params)}"
        )
    ts = torch.as_tensor(ts, dtype=y0.dtype, device=y0.device)
    if ts.dim() != 1 or ts.numel() < 1 or not bool(torch.isfinite(ts).all()):
        raise UserError(f"ts must be a finite 1-D tensor of save times; got {_shape(ts)}")
    if not bool((ts[1:] > ts[:-1]).all()):
        raise UserError("ts must be strictly increasing; sort the save times and drop repeats")
    bad = ~torch.isfinite(y0).all(-1)
    if bool(bad.any()):
        raise UserError(f"y0 must be finite; trajectory {int(bad.nonzero()[0])} is not")
    return y0.contiguous(), params.to(y0.dtype).contiguous(), ts


def check_tolerances(rtol: float, atol: float) -> None:
    """Raise UserError for tolerances too loose for the stored data to be the system's.

    At a relative or absolute error per step above `MAX_TOLERANCE` an adaptive integrator may
    change the dynamics it stores (a damped oscillator can gain energy and grow without
    bound); every built-in system has states of order one, and the default is 1e-8."""
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if tol > MAX_TOLERANCE:
            raise UserError(
                f"{name}={tol:g} is too loose for the data to follow the system (at most "
                f"{MAX_TOLERANCE:g}); use e.g. --{name} {DEFAULT_RTOL:g}"
            )


def _check_tolerance(rtol: float, dtype: torch.dtype) -> None:
    floor = 10 * torch.finfo(dtype).eps
    if rtol < floor:
        raise UserError(
            f"rtol={rtol:g} is finer than {str(dtype).removeprefix('torch.')} resolves; "
            f"use float64 states or rtol >= {floor:.1g}"
        )


def _check_field(system: System, y0: Tensor, params: Tensor, t: Tensor) -> None:
    with torch.no_grad():
        dy = system.vector_field(t, y0, system.view(params))
    if not isinstance(dy, Tensor) or dy.shape != y0.shape or dy.dtype != y0.dtype:
        got = f"{_shape(dy)} {getattr(dy, 'dtype', '')}".rstrip()
        raise UserError(
            f"vector field of system {system.name!r} returned {got} for y of shape "
            f"{tuple(y0.shape)} {y0.dtype}; it must return dy/dt with the shape and dtype of y"
        )


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _describe_params(system: System, p: Tensor) -> str:
    return ", ".join(f"{n}={float(v):.6g}" for n, v in zip(system.param_names, p, strict=True))


# --- torchdiffeq -----------------------------------------------------------------------------
def _torchdiffeq(system: System, y0, params, ts, name: str, rtol, atol) -> Tensor:
    pview = system.view(params)

    def rhs(t: Tensor, y: Tensor) -> Tensor:
        return system.vector_field(t, y, pview)

    import torchdiffeq

    ys = torchdiffeq.odeint(rhs, y0, ts, method=name, rtol=rtol, atol=atol)  # (T, B, S)
    return ys.transpose(0, 1).contiguous()  # (B, T, S)


# --- DOP853 over a batch ---------------------------------------------------------------------
def _dop853_batched(system, y0, params, ts, rtol, atol, index_offset, workers) -> Tensor:
    """Solve contiguous slices of the batch in parallel; turn a stuck trajectory into an error."""
    B, S = y0.shape
    n = max(1, min(workers or default_workers(), B // MIN_WORKER_BATCH))
    n = n if _CAN_FORK and y0.device.type == "cpu" else 1  # CUDA does not survive a fork
    bounds = [(B * i // n, B * (i + 1) // n) for i in range(n)]

    def solve(lo: int, hi: int) -> Tensor:
        # Pad to whole SIMD blocks with copies of the slice's first trajectory: no lane of any
        # op then falls in a scalar remainder loop, whose rounding may differ (e.g. for pow).
        take = torch.cat((torch.arange(lo, hi), torch.full((-(hi - lo) % LANES,), lo)))
        pview = system.view(params[take])
        try:
            ys = _dop853(lambda t, y: system.vector_field(t, y, pview), y0[take], ts, rtol, atol)
        except _Stuck as e:
            e.index += lo
            raise
        return ys[:, : hi - lo]  # (T, hi - lo, S)

    try:
        with _single_threaded_ops(), torch.inference_mode():
            shape = lambda lo, hi: (len(ts), hi - lo, S)  # noqa: E731
            children = [_Child(solve, lo, hi, shape(lo, hi), y0.dtype) for lo, hi in bounds[1:]]
            try:
                parts = [solve(*bounds[0])] + [child.result() for child in children]
            finally:
                for child in children:
                    child.kill()
    except _Stuck as e:
        state = ", ".join(f"{s}={float(v):.3g}" for s, v in zip(system.state, e.y, strict=True))
        raise DivergenceError(
            f"system {system.name!r} diverged: trajectory {e.index + index_offset} "
            f"({_describe_params(system, params[e.index])}) cannot be continued past "
            f"t={e.t:.6g} ({e.why}; state {state}); narrow the parameter ranges or the time span"
        ) from None
    ys = y0.new_empty(B, len(ts), S)  # outside inference mode: an ordinary tensor
    for (lo, hi), part in zip(bounds, parts, strict=True):
        ys[lo:hi] = part.transpose(0, 1)  # (hi - lo, T, S): batch first again
    return ys


@contextmanager
def _single_threaded_ops():
    """Run each torch op on one thread: ops this small gain nothing from intra-op threads, and
    splitting an op between threads would put lanes in scalar remainder loops."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
