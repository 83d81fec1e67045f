"""In-context system identification: fit a system's unknown parameters to a trajectory's context.

Every built-in system is linear in its unknown parameters, or in the combinations of them that
the data determines (its declared `identifiable`, e.g. k/m and c/m for the MSD):

    f(t, y, p) = F(t, y) c(p) + g(t, y)            c: K coefficients

`linear_form` finds F, g and c numerically for any registered system (no symbolic algebra: the
field is evaluated at K + 1 anchor parameter vectors whose coefficients are affinely
independent, and the decomposition is verified at random parameters and states). The integral
form of the equation over each window of two steps, by Simpson's rule,

    y_{t+1} - y_{t-1} = h/3 (f_{t-1} + 4 f_t + f_{t+1})  =>  r_t = Φ_t c,
        Φ_t = h/3 (F_{t-1} + 4 F_t + F_{t+1}),   r_t = y_{t+1} - y_{t-1} - h/3 (g_{t-1} + 4 g_t + g_{t+1})

makes the least-squares fit over a context a K x K solve of the normal equations
M = Σ Φ_tᵀ W Φ_t, v = Σ Φ_tᵀ W r_t: sums over time of nonlinear features of three consecutive
states. Simpson's local error is O(h^5) against O(h^3) for the one-step trapezoid rule (on the
Lotka-Volterra ranges, sampled at h·rate up to 1, that is 2e-4 against 1e-2 in the
coefficients); `RULES` holds both and Boole's.
That is the fit a scientist does by hand, and `ode_fit` reports it beside every model: fit each
trajectory's context, integrate the fitted equation from the last context observation. A
system that is not linear in its unknowns is fitted by Levenberg-Marquardt on the same
residuals instead (`fit_nonlinear`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from warp_phys.errors import UserError
from warp_phys.integrate import rk4
from warp_phys.physics import reference, spectral_radius
from warp_phys.system import System

LINEARITY_RTOL = 1e-7  # float64 check of f = F c + g, relative to the size of the terms
RIDGE = 1e-10  # relative floor added to the normal equations (an unexcited context stays solvable)
WIDEN = 4.0  # bounds of a fit: test ranges widened by this factor (ratio, or half-widths)
FORECAST_STEP_RATE = 0.2  # RK4 substeps of a forecast keep h·ρ(∂f/∂y) <= this
MAX_SUBSTEPS = 64
REFINE_ITERATIONS = 30  # Levenberg-Marquardt steps of the output-error refinement (at most)
REFINE_LYAPUNOV_SPAN = 1.0  # longest chaotic context refined, in Lyapunov times


def unknowns(
    system: System,
    learn: Sequence[str] | None = None,
    fixed: Mapping[str, float] | None = None,
) -> tuple[tuple[str, ...], dict[str, float]]:
    """Return the unknown parameter names and the held values of the others.

    Default: every parameter with a train range is unknown; the rest are held at their default
    (or at `fixed`)."""
    fixed = dict(fixed or {})
    names = system.param_names
    bad = [n for n in [*(learn or ()), *fixed] if n not in names]
    if bad:
        raise UserError(
            f"unknown parameter {bad[0]!r} of system {system.name!r}; its parameters are "
            f"{', '.join(names)}"
        )
    if learn is None:
        learn = [n for n in names if system.params[n].train is not None and n not in fixed]
    held = {n: float(fixed.get(n, system.params[n].default)) for n in names if n not in learn}
    return tuple(learn), held


@dataclass(frozen=True)
class LinearForm:
    """f(t, y, p) = F(t, y) c(p) + g(t, y) for a system's unknown parameters (see module doc).

    Attributes:
        names: the coefficients c: unknown parameters, or the system's identifiable combinations.
        kind: "params" or "identifiable".
        anchors: ``(K+1, P)`` parameter vectors, anchors[0] at the centre of the train ranges.
        basis: ``(K, K)`` inverse of the matrix of c(anchors[k]) - c(anchors[0]).
        centre, half: ``(K,)`` centre and half-width of the coefficients over the train ranges
            (the units of a normalised fit).
        low, high: ``(K,)`` bounds of a fitted coefficient (test ranges, widened).
        test_low, test_high: ``(K,)`` the coefficients' span over the test ranges.
    """

    system: System
    unknown: tuple[str, ...]
    held: dict[str, float]
    names: tuple[str, ...]
    kind: str
    anchors: Tensor
    coeffs0: Tensor
    basis: Tensor
    centre: Tensor
    half: Tensor
    low: Tensor
    high: Tensor
    test_low: Tensor
    test_high: Tensor

    @property
    def n(self) -> int:
        return len(self.names)

    def coefficients(self, params: Tensor) -> Tensor:
        """Return c(p) ``(..., K)`` for full parameter vectors ``params (..., P)``."""
        return _coefficients(self.system, self.kind, self.names, params)

    def features(self, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return F ``(..., S, K)`` and g ``(..., S)`` at times `t` (broadcast to y[..., 0])."""
        anchors = self.anchors.to(y)  # (K+1, P)
        K = self.n
        yk = y.unsqueeze(-2).expand(*y.shape[:-1], K + 1, y.shape[-1])  # (..., K+1, S)
        tk = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        tk = tk.unsqueeze(-1).expand(yk.shape[:-1]) if tk.dim() else tk
        f = self.system.f(tk, yk, anchors.expand(*y.shape[:-1], K + 1, anchors.shape[-1]))
        diff = (f[..., 1:, :] - f[..., :1, :]).transpose(-1, -2)  # (..., S, K)
        F = diff @ self.basis.to(y)  # (..., S, K)
        g = f[..., 0, :] - F @ self.coeffs0.to(y)  # (..., S)
        return F, g

    def field(self, t: Tensor, y: Tensor, c: Tensor) -> Tensor:
        """Return f(t, y) for coefficients ``c (..., K)`` broadcast against y."""
        F, g = self.features(t, y)
        return (F @ c.unsqueeze(-1)).squeeze(-1) + g

    def fast_field(self, c: Tensor):
        """Return ``f(t, y)`` at coefficients ``c (N, K)``, for many calls at the same c: the
        system's own vector field when the coefficients are its unknown parameters (one
        evaluation instead of the K + 1 of `field`); otherwise the mixture of the field at
        the anchors whose coefficients average to c (f is affine in c), weights computed once.
        """
        if self.kind != "params":
            w = (c - self.coeffs0.to(c)) @ self.basis.to(c).mT  # (N, K) weights of anchors 1..K
            weights = torch.cat((1 - w.sum(-1, keepdim=True), w), -1).unsqueeze(-1)  # (N, K+1, 1)
            anchors = self.anchors.to(c).expand(len(c), -1, -1)  # (N, K+1, P)

            def mixed(t, y):
                yk = y.unsqueeze(-2).expand(-1, self.n + 1, -1)  # (N, K+1, S)
                tk = torch.as_tensor(t, dtype=y.dtype, device=y.device)
                tk = tk.unsqueeze(-1).expand(yk.shape[:-1]) if tk.dim() else tk
                return (self.system.f(tk, yk, anchors) * weights).sum(-2)

            return mixed
        names = self.system.param_names
        cols = [
            c[:, self.names.index(n)] if n in self.names else c.new_full(c.shape[:1], self.held[n])
            for n in names
        ]
        p = torch.stack(cols, -1)  # (N, P)
        return lambda t, y: self.system.f(t, y, p)

    def jacobian(self, t: Tensor, y: Tensor, c: Tensor) -> Tensor:
        """Return ∂f/∂y ``(N, S, S)`` at coefficients ``c (N, K)`` (affine in c, like f)."""
        anchors = self.anchors.to(y)
        w = (c - self.coeffs0.to(y)) @ self.basis.to(y).mT  # (N, K): weights of anchors 1..K
        view = self.system.view
        J0 = self.system.jacobian(t, y, view(anchors[0].expand(len(y), -1)))  # (N, S, S)
        out = J0.clone()
        for k in range(self.n):
            Jk = self.system.jacobian(t, y, view(anchors[k + 1].expand(len(y), -1)))
            out = out + w[:, k, None, None] * (Jk - J0)
        return out.detach()

    def clamp(self, c: Tensor) -> Tensor:
        """Clip coefficients into the fit's bounds (a fit never leaves them)."""
        return torch.maximum(torch.minimum(c, self.high.to(c)), self.low.to(c))

    def spectral_radius(self, *, widened: bool = False) -> float:
        """Largest |eig ∂f/∂y| over reference states and the corners of the coefficients' test
        span (or of the fit's bounds when `widened`)."""
        lo, hi = (self.low, self.high) if widened else (self.test_low, self.test_high)
        corners = torch.tensor(list(itertools.product((0.0, 1.0), repeat=min(self.n, 8))))
        if self.n > 8:
            corners = torch.rand(256, self.n, generator=torch.Generator().manual_seed(0))
        pts = torch.cat((lo + (hi - lo) * corners.double(), self.centre[None]))  # (C, K)
        return spectral_radius(
            self.system, reference(self.system), pts, lambda t, y, c: self.jacobian(t, y, c)
        )


def _coefficients(system: System, kind: str, names: tuple[str, ...], params: Tensor) -> Tensor:
    view = system.view(params)
    if kind == "params":
        return torch.stack([getattr(view, n) for n in names], -1)
    return torch.stack(
        [torch.as_tensor(system.identifiable[n](view)).to(params) for n in names], -1
    )


def _full(system: System, unknown: Sequence[str], held: dict, values: dict) -> Tensor:
    """Parameter vector ``(P,)`` float64 from unknown values and held ones."""
    return torch.tensor(
        [values[n] if n in unknown else held[n] for n in system.param_names], dtype=torch.float64
    )


def _range_points(system: System, unknown, held, split: str, n_random: int) -> Tensor:
    """Corners of the unknowns' range box for `split`, their centre and random points, ``(C, P)``."""
    rng = np.random.default_rng(12345)
    box = [system.params[n].range(split) for n in unknown]
    corners = list(itertools.product(*box)) if len(unknown) <= 8 else []
    centre = [(lo + hi) / 2 for lo, hi in box]
    rand = [[lo + (hi - lo) * rng.random() for lo, hi in box] for _ in range(n_random)]
    rows = [dict(zip(unknown, v, strict=True)) for v in [centre, *corners, *rand]]
    return torch.stack([_full(system, unknown, held, r) for r in rows])


def linear_form(
    system: System,
    *,
    learn: Sequence[str] | None = None,
    fixed: Mapping[str, float] | None = None,
) -> LinearForm | None:
    """Return the linear decomposition of `system` in its unknowns, or None if it has none.

    Tries the system's identifiable combinations first (what the data determines), then the
    unknown parameters themselves. Raises UserError when nothing is unknown.
    """
    system.check_differentiable("the in-context least-squares fit")
    unknown, held = unknowns(system, learn, fixed)
    if not unknown:
        raise UserError(
            f"system {system.name!r} has no unknown parameters (none has a train range): "
            f"there is nothing to fit"
        )
    kinds = [("identifiable", tuple(system.identifiable))] if system.identifiable else []
    kinds.append(("params", unknown))
    for kind, names in kinds:
        form = _try_form(system, unknown, held, kind, names)
        if form is not None:
            return form
    return None


def _try_form(system, unknown, held, kind, names) -> LinearForm | None:
    train = _range_points(system, unknown, held, "train", 16)  # (C, P), row 0 the centre
    c_train = _coefficients(system, kind, names, train)  # (C, K)
    varies = (c_train - c_train[:1]).abs().amax(0) > 1e-12 * (1 + c_train[0].abs())
    names = tuple(n for n, v in zip(names, varies.tolist(), strict=True) if v)
    if not names:
        return None
    c_train = c_train[:, varies]
    anchors, D = _anchors(system, kind, names, train)
    if anchors is None:
        return None
    test = _range_points(system, unknown, held, "test_ood", 16)
    c_test = _coefficients(system, kind, names, test)
    lo, hi = c_test.amin(0), c_test.amax(0)
    positive = (torch.cat((c_train, c_test)) > 0).all(0)
    low = torch.where(positive, lo / WIDEN, (lo + hi) / 2 - WIDEN * (hi - lo) / 2 - 1e-12)
    high = torch.where(positive, hi * WIDEN, (lo + hi) / 2 + WIDEN * (hi - lo) / 2 + 1e-12)
    centre = (c_train.amin(0) + c_train.amax(0)) / 2
    half = ((c_train.amax(0) - c_train.amin(0)) / 2).clamp_min(1e-6 * centre.abs().clamp_min(1e-6))
    form = LinearForm(
        system=system, unknown=unknown, held=held, names=names, kind=kind, anchors=anchors,
        coeffs0=_coefficients(system, kind, names, anchors[:1])[0],
        basis=torch.linalg.inv(D), centre=centre, half=half, low=low, high=high,
        test_low=lo, test_high=hi,
    )  # fmt: skip
    return form if _verify(form, torch.cat((train, test))) else None


def _anchors(system, kind, names, points: Tensor) -> tuple[Tensor | None, Tensor]:
    """Pick anchors[0] = points[0] and K more rows whose coefficient differences are
    independent (greedy, well conditioned); return them and the ``(K, K)`` difference matrix."""
    c = _coefficients(system, kind, names, points)  # (C, K)
    K = len(names)
    scale = (c - c[:1]).abs().amax(0).clamp_min(1e-300)  # (K,)
    chosen: list[int] = []
    for _ in range(K):
        best, best_val = None, 0.0
        for i in range(1, len(points)):
            if i in chosen:
                continue
            rows = (c[[*chosen, i]] - c[:1]) / scale  # (k, K)
            val = float(torch.linalg.svdvals(rows).min())
            if val > best_val:
                best, best_val = i, val
        if best is None or best_val < 1e-6:
            return None, c.new_zeros(0)
        chosen.append(best)
    D = (c[chosen] - c[:1]).mT  # (K, K): column k is c(anchor k+1) - c(anchor 0)
    return points[[0, *chosen]], D


def _verify(form: LinearForm, params: Tensor) -> bool:
    """f(t, y, p) == F c(p) + g at reference states (and scaled ones) for every row of params."""
    ref = reference(form.system)
    t = torch.cat((ref.t, ref.t))
    y = torch.cat((ref.y, 1.3 * ref.y + 0.1 * ref.scale))  # (N, S): off the reference orbits too
    for p in params:
        pp = p.expand(len(t), -1)
        f = form.system.f(t, y, pp)
        F, g = form.features(t, y)
        c = form.coefficients(pp)
        Fc = (F @ c.unsqueeze(-1)).squeeze(-1)
        size = f.abs() + Fc.abs() + g.abs() + ref.scale * ref.rate
        if not ((f - Fc - g).abs() <= LINEARITY_RTOL * size).all():
            return False
    return True


# -- the fit ------------------------------------------------------------------------------------
# Newton-Cotes rules over a window of m consecutive steps: y_{a+m-1} - y_a = h Σ_j w_j f_{a+j}
RULES: dict[str, tuple[float, ...]] = {
    "trapezoid": (1 / 2, 1 / 2),  # local error O(h^3 f^(2))
    "simpson": (1 / 3, 4 / 3, 1 / 3),  # O(h^5 f^(4))
    "boole": (14 / 45, 64 / 45, 24 / 45, 64 / 45, 14 / 45),  # O(h^7 f^(6))
}
DEFAULT_RULE = "simpson"


def window_terms(
    form: LinearForm, t: Tensor, y: Tensor, rule: str = DEFAULT_RULE
) -> tuple[Tensor, Tensor]:
    """Return the normalised integral-form terms of every window of ``y (..., T, S)``.

    ``t (T,)`` (or broadcastable to ``y[..., 0]``), T >= len(rule). With m = len(rule) and
    windows a = 0..T-m: Φ_a = h Σ_j w_j F_{a+j} ``(..., T-m+1, S, K)`` times the coefficient
    half-widths, and r_a = y_{a+m-1} - y_a - h Σ_j w_j g_{a+j} - Φ_a c_centre ``(..., T-m+1, S)``,
    so that the fit solves (Σ ΦᵀWΦ) z = Σ ΦᵀW r for c = centre + half·z.
    """
    w = RULES[rule]
    m, T = len(w), y.shape[-2]
    F, g = form.features(t, y)  # (..., T, S, K), (..., T, S)
    tt = torch.as_tensor(t, dtype=y.dtype, device=y.device).expand(y.shape[:-1])  # (..., T)
    h = ((tt[..., m - 1 :] - tt[..., : T - m + 1]) / (m - 1)).unsqueeze(-1)  # (..., T-m+1, 1)
    Phi = sum(wj * F[..., j : T - m + 1 + j, :, :] for j, wj in enumerate(w)) * h.unsqueeze(-1)
    G = sum(wj * g[..., j : T - m + 1 + j, :] for j, wj in enumerate(w)) * h  # (..., T-m+1, S)
    r = y[..., m - 1 :, :] - y[..., : T - m + 1, :] - G
    r = r - (Phi @ form.centre.to(y).unsqueeze(-1)).squeeze(-1)
    return Phi * form.half.to(y), r


def solve_normal(M: Tensor, v: Tensor) -> Tensor:
    """Solve ``M (..., K, K) z = v (..., K)`` in float64 with a relative ridge floor."""
    M, v = M.double(), v.double()
    K = M.shape[-1]
    floor = RIDGE * (M.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) / K).clamp_min(1e-300)
    eye = torch.eye(K, dtype=M.dtype, device=M.device)
    return torch.linalg.solve(M + floor.unsqueeze(-1) * eye, v.unsqueeze(-1)).squeeze(-1)


def fit_coefficients(
    form: LinearForm, t: Tensor, ys: Tensor, weights: Tensor, rule: str = DEFAULT_RULE
) -> Tensor:
    """Least-squares coefficients ``(N, K)`` of the contexts ``ys (N, L, S)`` (closed form)."""
    Phi, r = window_terms(form, t.double(), ys.double(), rule)
    w = weights.double().sqrt()  # (S,)
    Pw = Phi * w[:, None]  # (N, L-m+1, S, K)
    M = torch.einsum("ntsk,ntsj->nkj", Pw, Pw)
    v = torch.einsum("ntsk,nts->nk", Pw, r * w)
    z = solve_normal(M, v)
    return form.clamp(form.centre + form.half * z)


def forecast(
    field,
    jacobian,
    y0: Tensor,
    t0: float,
    dt: float,
    n_steps: int,
    *,
    project=None,
    rate: float = FORECAST_STEP_RATE,
) -> Tensor:
    """Integrate ``field(t, y)`` from ``y0 (N, S)`` for `n_steps` steps of `dt` by RK4,
    ``(N, n_steps, S)``; a trajectory that blows up turns inf/NaN, it never raises.

    Each step takes as many RK4 substeps as keep h·‖∂f/∂y‖∞ <= `rate` at its start state
    (`jacobian(t, y) -> (N, S, S)`; the largest over the batch), so a forecast that enters
    a faster region than the context (a spike of a predator-prey cycle) stays stable.
    `project` (e.g. `System.project`) maps the start and every step into the state domain.
    """
    project = project or (lambda y: y)
    out, y = [], project(y0)
    for i in range(n_steps):
        t = t0 + i * dt
        y = project(rk4(field, y, dt, substeps_for(jacobian, t, y, dt, rate), t0=t))
        out.append(y)
    return torch.stack(out, 1)


def substeps_for(jacobian, t: float | Tensor, y: Tensor, dt: float, rate: float) -> int:
    """RK4 substeps keeping h·‖∂f/∂y‖∞ <= rate at states ``y (N, S)`` (capped at MAX_SUBSTEPS)."""
    with torch.no_grad():
        tt = torch.as_tensor(t, dtype=y.dtype, device=y.device).expand(y.shape[:-1])
        norm = jacobian(tt, y.detach()).abs().sum(-1).amax(-1)  # (N,) row-sum norm
        norm = norm[torch.isfinite(norm)]
        top = float(norm.max()) if norm.numel() else 0.0
    return int(min(MAX_SUBSTEPS, max(1, math.ceil(abs(dt) * top / rate - 1e-9))))


def fit_nonlinear(
    system: System,
    unknown: Sequence[str],
    held: dict[str, float],
    t: Tensor,
    ys: Tensor,
    weights: Tensor,
    *,
    iterations: int = 30,
    rule: str = DEFAULT_RULE,
) -> Tensor:
    """Levenberg-Marquardt on the integral-form residuals of every window (Newton-Cotes
    `rule`, as the linear fit); full parameters ``(N, P)``.

    Unknowns start at the centre of their train range, positive ones in log space, and stay
    within the test ranges widened by `WIDEN`."""
    N = ys.shape[0]
    names = system.param_names
    idx = [names.index(n) for n in unknown]
    base = torch.tensor([held.get(n, system.params[n].default) for n in names], dtype=torch.float64)
    pos = torch.tensor([system.params[n].is_positive for n in unknown])
    lo_t = torch.tensor(
        [system.params[n].range("test_ood")[0] for n in unknown], dtype=torch.float64
    )
    hi_t = torch.tensor(
        [system.params[n].range("test_ood")[1] for n in unknown], dtype=torch.float64
    )
    centre = torch.tensor([sum(system.params[n].range("train")) / 2 for n in unknown]).double()
    to_u = lambda p: torch.where(pos, torch.log(p.abs().clamp_min(1e-300)), p)  # noqa: E731
    from_u = lambda u: torch.where(pos, torch.exp(torch.where(pos, u, 0.0)), u)  # noqa: E731
    u_lo = torch.where(pos, to_u(lo_t) - math.log(WIDEN), lo_t - WIDEN * (hi_t - lo_t))
    u_hi = torch.where(pos, to_u(hi_t) + math.log(WIDEN), hi_t + WIDEN * (hi_t - lo_t))
    y = ys.double()
    t = t.double()
    rw = RULES[rule]
    m, T = len(rw), y.shape[1]
    h = ((t[m - 1 :] - t[: T - m + 1]) / (m - 1))[None, :, None]  # (1, T-m+1, 1)
    w = weights.double().sqrt()

    def residuals(u: Tensor) -> Tensor:  # u (N, L) -> (N, (T-m+1)·S)
        p = base.expand(N, -1).clone()
        p[:, idx] = from_u(u)
        pp = p[:, None, :].expand(-1, T, -1)
        f = system.f(t.expand(N, -1), y, pp)  # (N, T, S)
        integral = sum(wj * f[:, j : T - m + 1 + j] for j, wj in enumerate(rw)) * h
        r = y[:, m - 1 :] - y[:, : T - m + 1] - integral
        return (r * w).reshape(N, -1)

    u = to_u(centre).expand(N, -1).clone()
    lam = torch.full((N,), 1e-3, dtype=torch.float64)
    r = residuals(u)
    cost = (r**2).sum(-1)
    for _ in range(iterations):
        cols = []
        for j in range(len(idx)):
            du = torch.zeros_like(u)
            du[:, j] = 1e-6 * (1.0 + u[:, j].abs())
            cols.append((residuals(u + du) - r) / du[:, j : j + 1])
        J = torch.stack(cols, -1)  # (N, R, L)
        A = J.mT @ J
        g = J.mT @ r.unsqueeze(-1)
        damp = lam[:, None, None] * torch.diag_embed(A.diagonal(dim1=-2, dim2=-1) + 1e-12)
        step = torch.linalg.solve(A + damp, g).squeeze(-1)
        u_new = torch.maximum(torch.minimum(u - step, u_hi), u_lo)
        r_new = residuals(u_new)
        c_new = (r_new**2).sum(-1)
        ok = torch.isfinite(c_new) & (c_new < cost)
        u = torch.where(ok[:, None], u_new, u)
        r = torch.where(ok[:, None], r_new, r)
        cost = torch.where(ok, c_new, cost)
        lam = torch.where(ok, lam / 3, lam * 4).clamp(1e-12, 1e12)
    p = base.expand(N, -1).clone()
    p[:, idx] = from_u(u)
    return p


def output_error_applies(system: System, t: Tensor) -> bool:
    """Whether `refine_output_error` may refine a context at times ``t``: always, except for a
    chaotic system (one that declares a Lyapunov time) over more than `REFINE_LYAPUNOV_SPAN`
    Lyapunov times, where the distance to the observations of a path integrated through the
    whole context is too rugged to descend (measured on noisy Lorenz-63 over 4.5 Lyapunov
    times: σ 1.3% off before, 6.5% after); that needs multiple shooting, not done here."""
    if system.lyapunov_time is None:
        return True
    span = float(t[-1] - t[0])
    return span <= REFINE_LYAPUNOV_SPAN * system.lyapunov_time


def refine_output_error(
    form: LinearForm,
    t: Tensor,
    ys: Tensor,
    c0: Tensor,
    weights: Tensor,
    *,
    iterations: int = REFINE_ITERATIONS,
) -> tuple[Tensor, Tensor]:
    """Refine coefficients ``c0 (N, K)`` by output error over the contexts ``ys (N, L, S)``.

    The integral-form fit regresses on the observations themselves: with observation noise
    its regressors are noisy (errors in variables), which biases the coefficients, and a
    forecast from it starts at a noisy last observation. The output-error fit (single
    shooting) is the maximum-likelihood fit under Gaussian observation noise:
    Levenberg-Marquardt over the coefficients and the state at the start of the context,
    minimising the weighted distance between the observations and the fitted equation
    integrated through the context (RK4). It starts from `c0` and the first observation and
    accepts only steps that lower that distance. A state bounded below (a population) is
    fitted in log space above its bound, so the fitted path stays in its domain.

    Returns ``(c (N, K), path (N, L, S))``: the refined coefficients and the fitted path,
    whose last state is where a forecast starts. A context whose starting point cannot be
    integrated keeps `c0`, and its observations as the path.
    """
    system = form.system
    N, L, S = ys.shape
    K, P = form.n, form.n + S
    y = ys.double()
    t = torch.as_tensor(t, dtype=torch.float64, device=y.device)
    w = weights.double().to(y).sqrt()  # (S,)
    scale = reference(system).scale.to(y)  # (S,)
    centre, half = form.centre.to(y), form.half.to(y)
    z_lo, z_hi = (form.low.to(y) - centre) / half, (form.high.to(y) - centre) / half
    inf = float("inf")
    lower = y.new_tensor([system.state_bounds.get(n, (-inf, inf))[0] for n in system.state])
    logged = torch.isfinite(lower)  # (S,) states fitted as lower + exp(u)
    low = torch.where(logged, lower, 0.0)
    steps = (t[1:] - t[:-1]).tolist()
    with torch.no_grad():
        flat_c = c0.double().repeat_interleave(L, 0)
        jac = lambda tt, x: form.jacobian(tt, x, flat_c)  # noqa: E731
        n_sub = substeps_for(jac, t.repeat(N), y.reshape(-1, S), max(steps), FORECAST_STEP_RATE)

    def to_u(c: Tensor, x0: Tensor) -> Tensor:
        xs = torch.where(logged, torch.log((x0 - low).clamp_min(1e-6) / scale), x0 / scale)
        return torch.cat(((c - centre) / half, xs), -1)

    def split(u: Tensor) -> tuple[Tensor, Tensor]:
        c = centre + half * u[:, :K]
        x0 = torch.where(
            logged, low + scale * torch.exp(u[:, K:].clamp(max=30.0)), u[:, K:] * scale
        )
        return c, x0

    def path(u: Tensor) -> Tensor:  # (M, P) -> (M, L, S)
        c, x = split(u)
        field = form.fast_field(c)
        out = [x]
        for j, dt in enumerate(steps):
            x = rk4(field, x, dt, n_sub, t0=float(t[j]))
            out.append(x)
        return torch.stack(out, 1)

    def clip(u: Tensor) -> Tensor:
        return torch.cat((torch.maximum(torch.minimum(u[:, :K], z_hi), z_lo), u[:, K:]), -1)

    def residuals(u: Tensor, obs: Tensor) -> tuple[Tensor, Tensor]:
        r = ((path(u) - obs) * w).reshape(len(u), -1)
        cost = (r**2).sum(-1)
        return r, torch.where(torch.isfinite(cost), cost, inf)

    def linearise(u: Tensor, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Residuals, cost and forward-difference Jacobian ``(n, P, R)`` at ``u (n, P)``,
        from one batch of n (P + 1) paths."""
        n = len(u)
        du = 1e-6 * (1.0 + u.abs())  # (n, P)
        rows = torch.cat((u.unsqueeze(1), u.unsqueeze(1) + torch.diag_embed(du)), 1)
        r_all, c_all = residuals(rows.reshape(n * (P + 1), P), obs.repeat_interleave(P + 1, 0))
        r_all = r_all.view(n, P + 1, -1)
        J = (r_all[:, 1:] - r_all[:, :1]) / du.unsqueeze(-1)
        return r_all[:, 0], c_all.view(n, P + 1)[:, 0], torch.where(torch.isfinite(J), J, 0.0)

    with torch.no_grad():
        u = clip(to_u(c0.double(), y[:, 0]))
        r, cost, J = linearise(u, y)
        good = torch.isfinite(cost)  # (N,) contexts the shooting can start from
        lam = torch.full((N,), 1e-2, dtype=y.dtype, device=y.device)
        eye = torch.eye(P, dtype=y.dtype, device=y.device)
        active = good.nonzero().squeeze(-1)  # contexts still improving
        for _ in range(iterations):
            if not len(active):
                break
            ua, ra, Ja, la, ca = u[active], r[active], J[active], lam[active], cost[active]
            A = Ja @ Ja.mT  # (n, P, P)
            g = Ja @ torch.where(torch.isfinite(ra), ra, 0.0).unsqueeze(-1)  # (n, P, 1)
            damp = la[:, None, None] * (torch.diag_embed(A.diagonal(dim1=-2, dim2=-1)) + 1e-9 * eye)
            step = torch.linalg.solve(A + damp, g).squeeze(-1)
            u_new = clip(ua - torch.where(torch.isfinite(step), step, 0.0))
            # the trial and its Jacobian in one batch: a rejected trial keeps the old Jacobian
            r_new, c_new, J_new = linearise(u_new, y[active])
            ok = c_new < ca
            u[active] = torch.where(ok[:, None], u_new, ua)
            r[active] = torch.where(ok[:, None], r_new, ra)
            J[active] = torch.where(ok[:, None, None], J_new, Ja)
            cost[active] = torch.where(ok, c_new, ca)
            lam[active] = torch.where(ok, la / 3, la * 4).clamp(1e-12, 1e12)
            # done: an accepted step that no longer lowers the cost (relative 1e-10), or a
            # damping so high that no step is taken
            stalled = (ok & (ca - c_new <= 1e-10 * ca)) | (~ok & (la >= 1e8))
            active = active[~stalled]
        c, _ = split(u)
        fitted = r.view(N, L, S) / w + y  # the path at u (r = (path - y) · w)
    c = torch.where(good[:, None], c, c0.double())
    fitted = torch.where(good[:, None, None] & torch.isfinite(fitted), fitted, y)
    return c, fitted


def min_context(system: System, form: LinearForm | None, unknown: Sequence[str]) -> int:
    """The shortest context that fits the unknowns: one equation per window of the rule."""
    K = form.n if form is not None else len(unknown)
    return K + len(RULES[DEFAULT_RULE]) - 1


def check_fit_context(system: System, context: int) -> None:
    """Raise UserError when `context` is too short to fit the unknowns of `system` (a system
    with nothing unknown, or one no fit applies to, has nothing to check: ode_fit is then
    reported as not applicable, and a physics prior asked for says why itself)."""
    try:
        system.check_differentiable("the in-context fit")
    except UserError:
        return
    unknown, _ = unknowns(system)
    if not unknown:
        return
    need = min_context(system, linear_form(system), unknown)
    if context < need:
        raise UserError(
            f"a context of {context} steps is too short to fit the {len(unknown)} unknown "
            f"parameters of {system.name!r} from the data (ode_fit and WARP-Phys need at least "
            f"{need}); set data.context to {need} or more, e.g. --set data.context={max(need, 10)}"
        )


@dataclass(frozen=True)
class FitResult:
    """What `ode_fit` returns: forecasts, estimates and the cost of the fit."""

    forecast: Tensor  # (N, T-L, S): predictions of y_L..y_{T-1}
    estimates: dict[str, Tensor]  # name -> (N,): coefficients or parameters
    seconds_per_trajectory: float
    method: str  # "linear least squares" or "Levenberg-Marquardt"


def ode_fit(
    system: System,
    times: Tensor,
    ys: Tensor,
    context: int,
    *,
    weights: Tensor | None = None,
    learn: Sequence[str] | None = None,
    fixed: Mapping[str, float] | None = None,
    batch: int = 1024,
    refine: bool = False,
) -> FitResult:
    """Fit the unknowns of `system` to each context ``ys[:, :context] (N, T, S)`` and forecast.

    The reference a scientist computes by hand: least squares of the integral form over the
    context (Simpson's rule; a closed form for systems linear in their unknowns, else
    Levenberg-Marquardt), then the fitted equation integrated by RK4 from the last context
    observation (kept in the system's `state_bounds`) over the remaining steps. Raises
    UserError when the context is too short (fewer than K + 2 steps, K windows, for K
    unknowns) or nothing is unknown.

    With `refine` (for noisy observations) the linear fit is refined by output error
    (`refine_output_error`, where `output_error_applies`) and the forecast starts from the end
    of the fitted path instead of the last, noisy, observation.
    """
    system.check_differentiable("ode_fit")
    start = time.perf_counter()
    times = torch.as_tensor(times, dtype=torch.float64)
    N, T, S = ys.shape
    form = linear_form(system, learn=learn, fixed=fixed)
    unknown, held = unknowns(system, learn, fixed)
    need = min_context(system, form, unknown)
    if context < need:
        raise UserError(
            f"ode_fit needs at least {need} context steps to fit the unknowns of "
            f"{system.name!r}; got context {context}: set data.context higher"
        )
    ref = reference(system)
    w = 1.0 / ref.scale**2 if weights is None else weights.double()
    refined = refine and form is not None and output_error_applies(system, times[:context])
    dt = float(times[1] - times[0])
    t_ctx = times[:context]
    preds, est = [], {}
    for lo in range(0, N, batch):
        y = ys[lo : lo + batch].double()
        y_ctx = y[:, :context]
        y_start = y[:, context - 1]
        if form is not None:
            c = fit_coefficients(form, t_ctx, y_ctx, w)  # (n, K)
            if refined:
                c, fitted = refine_output_error(form, t_ctx, y_ctx, c, w)
                y_start = fitted[:, -1]
            field = lambda t, x, c=c: form.field(t, x, c)  # noqa: E731
            jac = lambda t, x, c=c: form.jacobian(t, x, c)  # noqa: E731
            parts = dict(zip(form.names, c.unbind(-1), strict=True))
        else:
            p = fit_nonlinear(system, unknown, held, t_ctx, y_ctx, w)  # (n, P)
            field = lambda t, x, p=p: system.f(t, x, p)  # noqa: E731
            jac = lambda t, x, p=p: system.jacobian(t, x, system.view(p)).detach()  # noqa: E731
            parts = {n: p[:, system.param_names.index(n)] for n in unknown}
        with torch.no_grad():
            t_last = float(times[context - 1])
            pred = forecast(field, jac, y_start, t_last, dt, T - context, project=system.project)
        preds.append(pred.float())
        for k, v in parts.items():
            est.setdefault(k, []).append(v)
    seconds = (time.perf_counter() - start) / max(N, 1)
    method = "linear least squares" if form is not None else "Levenberg-Marquardt"
    method += ", refined by output error" if refined else ""
    return FitResult(
        forecast=torch.cat(preds),
        estimates={k: torch.cat(v) for k, v in est.items()},
        seconds_per_trajectory=seconds,
        method=method,
    )
