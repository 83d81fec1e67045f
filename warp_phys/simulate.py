"""Batched integration of a `System` over trajectories with per-trajectory parameters.

The default integrator, ``"dop853"``, is Hairer's DOP853 (explicit Runge-Kutta 8(5,3) with
its 7th-order continuous extension; Hairer, Norsett & Wanner, *Solving ODEs I*, sec. II.10)
with the rules of scipy's ``solve_ivp(method="DOP853")`` (initial step, error norm, step
factors), vectorised over trajectories in torch. Every trajectory keeps its own clock, step
size and accept/reject decision, so the batch never marches at its hardest member's pace,
and the saved grid is read off the dense output without shortening any step.

Bitwise reproducibility: every floating-point operation is elementwise over trajectories
(stage sums accumulate in stage order, the error norm is an explicit sum over the state:
never a reduction whose order could depend on the batch shape), ops run single-threaded,
and each batch is padded to a whole number of SIMD blocks so that every lane of every op,
ours and the vector field's, runs the same vectorised code. One trajectory's bytes
therefore do not depend on which trajectories share its batch: a store written in chunks of
any size holds the same numbers. (They may differ between machines and torch versions.)

Speed: one Python-level op covers the whole batch, so the per-step cost is a few hundred
tensor ops whatever the batch; large batches are split between forked worker processes.

``method="torchdiffeq:<name>"`` (e.g. ``"torchdiffeq:dopri5"``) integrates with torchdiffeq
instead: one step size shared by the whole batch, so results depend on the batch.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import numbers
import os
import pickle
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
import torchdiffeq
from scipy.integrate._ivp import dop853_coefficients as _dop853
from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS

from warp_phys.errors import DivergenceError, UserError
from warp_phys.system import System

DEFAULT_METHOD = "dop853"
DEFAULT_RTOL = 1e-8
DEFAULT_ATOL = 1e-8
TORCHDIFFEQ_PREFIX = "torchdiffeq:"
MAX_STEPS = 200_000  # step attempts per trajectory before giving up (stiff or endless)
MIN_WORKER_BATCH = 1024  # trajectories per worker below which a second one does not pay
LANES = 64  # batches are padded to a multiple of this: >= 2 SIMD registers of float64 anywhere
_CAN_FORK = sys.platform == "linux"  # workers are forked processes; elsewhere one process
_SCAN_LIMIT = 32  # grid points one step may pass before they are counted by binary search

Field = Callable[[Tensor, Tensor], Tensor]  # (t (B,), y (B, S)) -> dy/dt (B, S)


# --- DOP853 tableau, as scipy ships it ---------------------------------------------------------
# Every linear combination of the stages K_0..K_15 a step needs, one row each: the inputs of
# stages 1..11, y_new (weights B), the error estimates E5 and E3, the inputs of the dense-output
# stages 13..15 and the dense-output coefficients D0..D3. In this order each K_j feeds one
# contiguous block of rows, so a single multiply-add per stage updates all the sums using it.
_N = _dop853.N_STAGES  # 12 stages; K[12] = f(t + h, y_new) is also the next step's K[0]
_ROWS = np.zeros((21, _dop853.N_STAGES_EXTENDED))
_ROWS[:11] = _dop853.A[1:_N]
_ROWS[11, :_N] = _dop853.B
_ROWS[12, : _N + 1], _ROWS[13, : _N + 1] = _dop853.E5, _dop853.E3
_ROWS[14:17] = _dop853.A[_N + 1 :]
_ROWS[17:] = _dop853.D
_ROW_OF_STAGE = {s: s - 1 for s in range(1, _N)} | {13: 14, 14: 15, 15: 16}
_ROW_Y_NEW, _ROW_E5, _ROW_E3, _ROW_D = 11, 12, 13, 17
_SPANS = tuple((int(nz.min()), int(nz.max()) + 1) for nz in (np.flatnonzero(c) for c in _ROWS.T))
_C = tuple(float(c) for c in _dop853.C)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0  # scipy's step-size controller


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
    solvers = list(_TORCHDIFFEQ_SOLVERS)
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

    ys = torchdiffeq.odeint(rhs, y0, ts, method=name, rtol=rtol, atol=atol)  # (T, B, S)
    return ys.transpose(0, 1).contiguous()  # (B, T, S)


# --- DOP853 over a batch ---------------------------------------------------------------------
class _Stuck(Exception):
    """Trajectory `index` of the solved batch cannot be advanced past time `t`."""

    def __init__(self, index: int, t: float, y: Tensor, why: str) -> None:
        super().__init__(why)
        self.index, self.t, self.y, self.why = index, t, y, why


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


def default_workers() -> int:
    """Return the cores not already busy: available cores less the 1-minute load, at least 1.

    On a shared machine whose cores other jobs keep busy, a second worker only competes for
    them and costs more CPU (each one steps its own, smaller batch); on an idle one it pays.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores or 1, round((cores or 1) - busy)))


class _Child:
    """Run ``solve(lo, hi)`` in a forked process, which shares no GIL with us.

    The result lands in an anonymous shared mapping made before the fork; a pipe brings back
    ``None`` or the failure. Only used where fork is safe for torch (Linux).
    """

    def __init__(self, solve: Callable[[int, int], Tensor], lo: int, hi: int, shape, dtype) -> None:
        self._buffer = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)  # MAP_SHARED
        self.out = torch.frombuffer(self._buffer, dtype=dtype).view(shape)
        read, write = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                os.close(read)
                _die_with(parent)
                self.out.copy_(solve(lo, hi))
                msg = None
            except _Stuck as e:
                msg = ("stuck", e.index, e.t, e.y.tolist(), e.why)
            except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
                msg = ("error", e)
            try:
                os.write(write, _pickle(msg))
            finally:
                os._exit(0)
        os.close(write)
        self.pid: int | None = pid
        self._read = read

    def result(self) -> Tensor:
        """Wait for the child; return its slice ``(T, n, S)`` or raise its failure."""
        data = b"".join(iter(lambda: os.read(self._read, 1 << 16), b""))
        self._reap()
        if not data:
            raise RuntimeError("a simulation worker process died without a result")
        msg = pickle.loads(data)
        if msg is None:
            return self.out
        if msg[0] == "stuck":
            raise _Stuck(msg[1], msg[2], torch.tensor(msg[3]), msg[4])
        raise msg[1]

    def kill(self) -> None:
        """Stop the child if it is still running (we failed first)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            self._reap()

    def _reap(self) -> None:
        if self.pid is not None:
            os.waitpid(self.pid, 0)
            os.close(self._read)
            self.pid = None


def _die_with(parent: int) -> None:
    """Have the kernel kill this (child) process when `parent` dies, e.g. by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _pickle(msg) -> bytes:
    try:
        return pickle.dumps(msg)
    except Exception:  # an unpicklable exception: keep its type name and message
        return pickle.dumps(("error", RuntimeError(f"{type(msg[1]).__name__}: {msg[1]}")))


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


def _sum_state(x: Tensor) -> Tensor:
    """Sum ``(B, S)`` over the state by explicit adds in column order: ``(B,)``."""
    cols = x.unbind(-1)
    acc = cols[0].clone()
    for c in cols[1:]:
        acc += c
    return acc


def _sum_squares(x: Tensor) -> Tensor:
    return _sum_state(x * x)


def _root8(x: Tensor) -> Tensor:
    """x ** (1/8) by three square roots: correctly rounded, where pow is only faithful."""
    return x.sqrt().sqrt().sqrt()


def _initial_step(f: Field, t0: Tensor, y0: Tensor, f0: Tensor, span: Tensor, rtol, atol) -> Tensor:
    """Per-trajectory first step (Hairer et al., sec. II.4; scipy's `select_initial_step`)."""
    S = y0.shape[1]
    scale = atol + y0.abs() * rtol
    d0 = (_sum_squares(y0 / scale) / S).sqrt()
    d1 = (_sum_squares(f0 / scale) / S).sqrt()
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span)
    f1 = f(t0 + h0, y0 + h0[:, None] * f0)
    d2 = (_sum_squares((f1 - f0) / scale) / S).sqrt() / h0
    tiny = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(tiny, torch.clamp(h0 * 1e-3, min=1e-6), _root8(0.01 / torch.fmax(d1, d2)))
    return torch.fmin(torch.fmin(100 * h0, h1), span)  # fmin/fmax: a NaN from f1 is ignored


def _stage_sums(dtype, device) -> list[Tensor]:
    """Column j of `_ROWS`, restricted to the rows K_j feeds: ``(rows, 1, 1)`` each."""
    M = torch.tensor(_ROWS, dtype=dtype, device=device)[:, :, None, None]  # (21, 16, 1, 1)
    return [M[lo:hi, j] for j, (lo, hi) in enumerate(_SPANS)]


def _push(K: list[Tensor], acc: Tensor, cols: list[Tensor], k: Tensor) -> None:
    """Append stage ``k (B, S)`` and add its multiples to the running sums ``acc (21, B, S)``."""
    lo, hi = _SPANS[len(K)]
    acc[lo:hi].addcmul_(cols[len(K)], k)  # elementwise: every sum accumulates in stage order
    K.append(k)


def _stages(f: Field, tc: Tensor, y, f0, hS, cols) -> tuple[list[Tensor], Tensor, Tensor]:
    """Return the stages ``K[:13]`` of one step, their running sums ``acc`` and ``y_new``.

    ``tc (16, B)`` are the stage times t + c_s h and ``hS (B, S)`` the step per trajectory.
    """
    K, acc = [f0], cols[0] * f0  # (21, B, S): K_0 feeds every row
    for s in range(1, _N):
        _push(K, acc, cols, f(tc[s], y + acc[_ROW_OF_STAGE[s]] * hS))
    y_new = y + acc[_ROW_Y_NEW] * hS
    _push(K, acc, cols, f(tc[_N], y_new))
    return K, acc, y_new


def _error_norm(acc: Tensor, h: Tensor, y: Tensor, y_new: Tensor, rtol, atol) -> Tensor:
    """Per-trajectory error norm (scipy's `DOP853._estimate_error_norm`): ``(B,)``."""
    scale = atol + torch.maximum(y.abs(), y_new.abs()) * rtol
    e5 = _sum_squares(acc[_ROW_E5] / scale)
    e3 = _sum_squares(acc[_ROW_E3] / scale)
    err = h * e5 / ((e5 + 0.01 * e3) * y.shape[1]).sqrt()
    return torch.where((e5 == 0) & (e3 == 0), 0.0, err)


def _step_factor(err: Tensor, ok: Tensor, retry: Tensor) -> Tensor:
    """Next-step factor: grow at most 10x, not at all right after a rejection; shrink at most 5x."""
    factor = _SAFETY / _root8(err)  # SAFETY * err^(-1/8): inf for err == 0, NaN for NaN
    grow = torch.fmin(factor, torch.where(retry, 1.0, _MAX_FACTOR))
    shrink = torch.fmax(factor, torch.full_like(factor, _MIN_FACTOR))  # a NaN error shrinks 5x
    return torch.where(ok, grow, shrink)


def _dense_coeffs(f: Field, tc, y, y_new, K, acc, cols, hS) -> list[Tensor]:
    """Return F0..F6 of the 7th-order continuous extension (3 more stages; scipy's layout)."""
    for s in range(_N + 1, len(_C)):
        _push(K, acc, cols, f(tc[s], y + acc[_ROW_OF_STAGE[s]] * hS))
    dy = y_new - y
    F = [dy, K[0] * hS - dy, 2 * dy - (K[_N] + K[0]) * hS]
    return F + list((acc[_ROW_D:] * hS).unbind(0))


def _dense_eval(F: list[Tensor], y: Tensor, x: Tensor) -> Tensor:
    """Evaluate the continuous extension at step fractions ``x (P, B)``: ``(P, B, S)``."""
    xs = x[..., None].expand(*x.shape, y.shape[1]).contiguous()  # (P, B, S)
    one_minus = 1 - xs
    acc = F[-1] * xs
    for i, Fi in enumerate(reversed(F[:-1]), start=1):
        acc += Fi
        acc *= one_minus if i % 2 else xs
    return acc + y


def _points_passed(ts: Tensor, dt_min: float, nxt, t_new, h, ok) -> Tensor:
    """Count the grid points in (t, t_new] of each accepted step, ``(B,)``."""
    T = ts.shape[0]
    k = int(float(h.max()) / dt_min) + 2  # a step of length h passes at most h / dt_min + 1 points
    if k > _SCAN_LIMIT:
        return torch.where(ok, torch.searchsorted(ts, t_new, right=True) - nxt, 0)
    j = nxt + torch.arange(k, device=ts.device)[:, None]  # (k, B) candidate grid indices
    passed = (ts.take(j.clamp(max=T - 1)) <= t_new) & (j < T)  # a prefix along k: ts is sorted
    return torch.where(ok, passed.sum(0), 0)


def _dop853(f: Field, y0: Tensor, ts: Tensor, rtol: float, atol: float) -> Tensor:
    """Integrate ``y0 (B, S)`` over ``ts (T,)``, one step size per trajectory: ``(T, B, S)``.

    Time comes first in the result because trajectories advance at similar rates: the writes
    of one iteration then land close together in memory.
    """
    B, S = y0.shape
    T = ts.shape[0]
    out = y0.new_empty((T + 1) * B, S)  # row j * B + b is y_b(ts[j]); block T takes unused lanes
    out[:B] = y0
    t, y, fy, t_end = ts[0].expand(B).clone(), y0, f(ts[0].expand(B), y0), ts[-1]
    bad = ~torch.isfinite(_sum_state(fy))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise _Stuck(i, float(t[i]), y[i], "the vector field is not finite at the initial state")
    h = _initial_step(f, t, y, fy, t_end - t, rtol, atol)
    dt_min = float((ts[1:] - ts[:-1]).min()) if T > 1 else math.inf
    C = torch.tensor(_C, dtype=y0.dtype, device=y0.device)[:, None]  # (16, 1)
    cols = _stage_sums(y0.dtype, y0.device)
    rows = torch.arange(B, device=y0.device)
    nxt = torch.ones(B, dtype=torch.long, device=y0.device)  # next grid index to save
    done = nxt >= T
    retry = torch.zeros_like(done)  # the last attempt was rejected
    for _ in range(MAX_STEPS):
        if bool(done.all()):
            return out[: T * B].view(T, B, S)
        min_step = 10 * (torch.nextafter(t, t.new_tensor(math.inf)) - t)
        stuck = retry & ~(h >= min_step)
        if bool(stuck.any()):
            i = int(stuck.nonzero()[0])
            raise _Stuck(i, float(t[i]), y[i], f"the step size fell to {float(h[i]):.3g}")
        h = torch.where(retry, h, torch.maximum(h, min_step))
        t_new = torch.minimum(t + h, t_end)
        h = t_new - t  # (B,) the step actually attempted; 0 once a trajectory is done
        hS = h[:, None].expand(B, S).contiguous()  # (B, S)
        tc = t + C * h  # (16, B) stage times
        K, acc, y_new = _stages(f, tc, y, fy, hS, cols)
        err = _error_norm(acc, h, y, y_new, rtol, atol)
        ok = (err < 1) & torch.isfinite(_sum_state(y_new)) & ~done
        n_pass = _points_passed(ts, dt_min, nxt, t_new, h, ok)  # (B,)
        if (p := int(n_pass.max())) > 0:
            F = _dense_coeffs(f, tc, y, y_new, K, acc, cols, hS)
            j = nxt + torch.arange(p, device=y0.device)[:, None]  # (P, B) grid indices
            x = (ts.take(j.clamp(max=T - 1)) - t) / h  # (P, B) fractions of the step
            dest = torch.where(j < nxt + n_pass, j, T) * B + rows  # (P, B) rows of `out`
            out.index_copy_(0, dest.view(-1), _dense_eval(F, y, x).view(-1, S))
        okS = ok[:, None].expand(B, S).contiguous()  # (B, S)
        t, y = torch.where(ok, t_new, t), torch.where(okS, y_new, y)
        fy = torch.where(okS, K[_N], fy)
        h = h * _step_factor(err, ok, retry)
        nxt, retry = nxt + n_pass, ~ok & ~done
        done = nxt >= T
        h = torch.where(done, 0.0, h)
    i = int((~done).nonzero()[0])
    raise _Stuck(i, float(t[i]), y[i], f"more than {MAX_STEPS} steps: stiff, or too long a span")
