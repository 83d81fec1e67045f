"""DOP853: Hairer's explicit Runge-Kutta 8(5,3) with its 7th-order continuous extension.

The tableau is scipy's (Hairer, Norsett & Wanner, *Solving ODEs I*, sec. II.10) and the step
rules are those of ``solve_ivp(method="DOP853")`` (initial step, error norm, step factors),
vectorised over a batch of trajectories in torch: each trajectory keeps its own clock, step
size and accept/reject decision, and the save grid is read off the dense output without
shortening any step. Every floating-point operation is elementwise over trajectories (stage
sums accumulate in stage order, the error norm is an explicit sum over the state), so one
trajectory's bytes do not depend on the rest of its batch; `simulate.py` adds the padding,
threading and worker processes that keep it so.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MAX_STEPS = 200_000  # step attempts per trajectory before giving up (stiff or endless)
_SCAN_LIMIT = 32  # grid points one step may pass before they are counted by binary search

Field = Callable[[Tensor, Tensor], Tensor]  # (t (B,), y (B, S)) -> dy/dt (B, S)


# --- DOP853 tableau, as scipy ships it ---------------------------------------------------------
def _scipy_tableau():
    """scipy's module of DOP853 coefficients (numpy arrays only), loaded from its file: importing
    it through ``scipy.integrate`` would first import all of scipy.integrate (0.6 s)."""
    scipy_dir = Path(importlib.util.find_spec("scipy").origin).parent
    path = scipy_dir / "integrate" / "_ivp" / "dop853_coefficients.py"
    if not path.is_file():  # another scipy layout: the slower import still works
        return importlib.import_module("scipy.integrate._ivp.dop853_coefficients")
    spec = importlib.util.spec_from_file_location("_warp_phys_dop853_coefficients", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TABLEAU = _scipy_tableau()
# Every linear combination of the stages K_0..K_15 a step needs, one row each: the inputs of
# stages 1..11, y_new (weights B), the error estimates E5 and E3, the inputs of the dense-output
# stages 13..15 and the dense-output coefficients D0..D3. In this order each K_j feeds one
# contiguous block of rows, so a single multiply-add per stage updates all the sums using it.
_N = _TABLEAU.N_STAGES  # 12 stages; K[12] = f(t + h, y_new) is also the next step's K[0]
_ROWS = np.zeros((21, _TABLEAU.N_STAGES_EXTENDED))
_ROWS[:11] = _TABLEAU.A[1:_N]
_ROWS[11, :_N] = _TABLEAU.B
_ROWS[12, : _N + 1], _ROWS[13, : _N + 1] = _TABLEAU.E5, _TABLEAU.E3
_ROWS[14:17] = _TABLEAU.A[_N + 1 :]
_ROWS[17:] = _TABLEAU.D
_ROW_OF_STAGE = {s: s - 1 for s in range(1, _N)} | {13: 14, 14: 15, 15: 16}
_ROW_Y_NEW, _ROW_E5, _ROW_E3, _ROW_D = 11, 12, 13, 17
_SPANS = tuple((int(nz.min()), int(nz.max()) + 1) for nz in (np.flatnonzero(c) for c in _ROWS.T))
_C = tuple(float(c) for c in _TABLEAU.C)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0  # scipy's step-size controller


class _Stuck(Exception):
    """Trajectory `index` of the solved batch cannot be advanced past time `t`."""

    def __init__(self, index: int, t: float, y: Tensor, why: str) -> None:
        super().__init__(why)
        self.index, self.t, self.y, self.why = index, t, y, why


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
