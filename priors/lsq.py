"""In-context least squares (WARP-Phys): θ accumulates the normal equations of the fit of the
system's own equation to the context, and the root solves them, then integrates the result.

For a system linear in its unknowns, f(t, y, p) = F(t, y) c + g(t, y) (`warp_phys.identify`),
Simpson's rule over each window of three fed values gives one linear equation in c,

    x_t - x_{t-2} - h/3 (g_{t-2} + 4 g_{t-1} + g_t) = h/3 (F_{t-2} + 4 F_{t-1} + F_t) c,

so the least-squares c of everything fed so far solves M c = v, where M and v are sums over t
of nonlinear features ψ_t of (x_{t-2}, x_{t-1}, x_t): a linear recurrence with A = 1 and a fixed
B accumulates them, the scan stays parallel, and on clean data the root is the exact fit from
the first step of training. The same θ carries exponential filters of the observations (A = λ,
a bank of λ), from which the root estimates the state at the end of the context,

    x̂_t = Σ_j w_j [x_j + ∫_{t_j}^{t} f(c)],     w_j ∝ λ^{t - j},

exact on clean data for every λ, and less noisy than x_t on noisy data: the forecast starts
from a mixture of these estimates. What is learned lives in θ_0: the weights of the mixture,
per state (how much to trust the last observation against the filters: the learned
correction for noise), and, with `learn_prior`, pseudo-observations of the coefficients added
to M and v (a prior learned from the training ranges: it shrinks estimates towards them, which
helps in distribution and hurts out of it, so it is off by default). Units: each equation is divided by the state's reference scale and by the step's
reference change h·rate, so every window adds O(1) to M whatever the system.

With noisy observations the integral-form fit is biased (its regressors are the noisy
observations themselves) and the filtered start state is still noisy; `refine = N` adds the
output-error refinement of `identify.refine_output_error`: θ also holds the observations
themselves (a register, A = 1, one slot per step of the grid and state: the sufficient
statistic of a fit by simulation, for which no smaller sum exists), and at the end of the
context (`finish_context`, with `hold_after_context`) the root runs up to N Levenberg-Marquardt
steps of the fitted equation integrated through the context against them, from the
least-squares solution; it forecasts from the end of that fitted path with the refined
coefficients. That is the maximum-likelihood fit under Gaussian observation noise, the
same fit the `ode_fit` reference makes on noisy stores.

θ layout (D slots): M (upper triangle, K(K+1)/2), v (K), n (fed steps), C_P (S·K), C_q (S)
running sums; per λ: E_x (S), E_P (S·K), E_q (S) filters; mixture logits (one per λ); with
`refine`: X (W·S) the register of observations (as fed: exact in float32), then c_fit (K),
x_fit (S), each as a float32 pair (value, remainder) that carries float64, and fitted (1),
written by `finish_context`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from warp_phys.errors import UserError
from warp_phys.identify import (
    linear_form,
    output_error_applies,
    refine_output_error,
    substeps_for,
)
from warp_phys.integrate import rk4
from warp_phys.physics import check_grid, reference, resolve_system, time_map
from warp_phys.root import AbstractRoot, register_prior
from warp_phys.system import System

SMOOTHING = (0.5, 0.75, 0.875, 0.9375)  # λ of the filters (besides λ = 0: the last value)
PRIOR_WEIGHT = 1e-6  # θ_0's initial M: pseudo-observations, negligible against one window
# RK4 substeps keep h·‖∂f/∂y‖∞ <= this at the start of each forecast step (in training, where
# the states are data, h·ρ(∂f/∂y) <= this over the test ranges: no Jacobian per step)
STEP_RATE = 0.25


@register_prior("lsq")
class LeastSquaresRoot(AbstractRoot):
    """θ = normal equations of the context's integral-form fit; root = solve, then RK4.

    root = build_root("lsq", state_dim=2, system=get_system("pendulum"))
    root.physical_params(theta, tau, y_prev)   # {"g/L": ..., "b": ...}
    """

    physical_units = True  # raw states: the equations hold in physical units
    input_window = 3  # Simpson's rule over x_{t-2}, x_{t-1}, x_t

    def __init__(
        self,
        *,
        state_dim: int,
        system: System | None = None,
        system_name: str | None = None,  # a registered system; wins over `system`
        learn: Sequence[str] | None = None,  # unknown parameters; default: those with ranges
        fixed: Mapping[str, float] | None = None,  # held values of the others
        smoothing: Sequence[float] = SMOOTHING,  # λ of the state filters, each in (0, 1)
        substeps: int | str = "auto",  # RK4 substeps per step; "auto": h·ρ <= STEP_RATE
        learn_prior: bool = False,  # learn pseudo-observations of c (shrinks towards train)
        refine: int = 0,  # most Levenberg-Marquardt steps of the output-error refinement (0: off)
        window: int | None = None,  # steps the register holds (default: the whole grid)
    ) -> None:
        super().__init__()
        self.system = resolve_system(
            "lsq", state_dim=state_dim, system=system, system_name=system_name
        )
        form = linear_form(self.system, learn=learn, fixed=fixed)
        if form is None:
            raise UserError(
                f"prior 'lsq' needs a system linear in its unknown parameters (or in its "
                f"declared identifiable combinations); {self.system.name!r} is not: use prior "
                f"'ode'"
            )
        lams = [float(v) for v in smoothing]
        if not all(0.0 < v < 1.0 for v in lams):
            raise UserError(f"prior 'lsq': smoothing values must lie in (0, 1); got {smoothing!r}")
        if not (substeps == "auto" or (isinstance(substeps, int) and substeps >= 1)):
            raise UserError(f"prior 'lsq': substeps must be 'auto' or >= 1; got {substeps!r}")
        if isinstance(refine, bool) or not (isinstance(refine, int) and refine >= 0):
            raise UserError(f"prior 'lsq': refine must be an integer >= 0; got {refine!r}")
        window = self.system.n_steps if window is None else window
        if isinstance(window, bool) or not (isinstance(window, int) and window >= 3):
            raise UserError(f"prior 'lsq': window must be an integer >= 3; got {window!r}")
        self.refine, self.window = refine, window if refine else 0
        self.finishes_context = bool(refine)
        self.form = form
        self.names = form.names
        self.learn_prior = bool(learn_prior)
        S, K = state_dim, form.n
        ref = reference(self.system)
        self.t_start, self.t_length = time_map(self.system)
        self.h_sys = self.t_length / (self.system.n_steps - 1)  # the store's time step
        self.nu = 1.0 / (self.h_sys * ref.rate)  # 1 / (reference change of a state per step)
        self.register_buffer("scale", ref.scale.clone(), False)  # (S,) float64
        self.register_buffer("lams", torch.tensor([0.0, *lams], dtype=torch.float64), False)
        self.substeps = substeps
        self.rho = form.spectral_radius()  # over the test ranges: the substeps of training
        self._layout(S, K, len(lams) + 1)

    # -- layout ------------------------------------------------------------------------------
    def _layout(self, S: int, K: int, n_bank: int) -> None:
        tri = K * (K + 1) // 2
        # ψ: [vech M (tri), v (K), 1, P (S·K), q (S), x (S)]
        self.psi_slices = {}
        k = 0
        psi = (("M", tri), ("v", K), ("one", 1), ("P", S * K), ("q", S), ("x", S))
        for name, size in psi + (("reg", self.window * S),):
            self.psi_slices[name] = slice(k, k + size)
            k += size
        self.n_inputs = k
        # θ: [M, v, n, C_P, C_q, (E_x, E_P, E_q) per λ, logits]
        slots, k = {}, 0
        for name, size in (("M", tri), ("v", K), ("n", 1), ("C_P", S * K), ("C_q", S)):
            slots[name] = slice(k, k + size)
            k += size
        for b in range(n_bank):
            for name, size in (("E_x", S), ("E_P", S * K), ("E_q", S)):
                slots[f"{name}{b}"] = slice(k, k + size)
                k += size
        slots["logits"] = slice(k, k + n_bank * S)  # (n_bank, S): a mixture per state
        k += n_bank * S
        refined = (("X", self.window * S), ("c_fit", 2 * K), ("x_fit", 2 * S), ("fitted", 1))
        for name, size in refined:
            slots[name] = slice(k, k + size if self.refine else k)
            k += size if self.refine else 0
        self.slots, self.n_weights, self.n_bank = slots, k, n_bank
        self.tri = torch.triu_indices(K, K)  # (2, tri) row, col of vech entries

    def recurrence(self) -> tuple[Tensor, Tensor]:
        D, s, p = self.n_weights, self.slots, self.psi_slices
        decay = torch.ones(D, dtype=torch.float64)
        drive = torch.zeros(D, self.n_inputs, dtype=torch.float64)

        def route(slot: slice, src: slice) -> None:
            drive[slot, src] = torch.eye(slot.stop - slot.start, dtype=torch.float64)

        for name, src in (("M", "M"), ("v", "v"), ("n", "one"), ("C_P", "P"), ("C_q", "q")):
            route(s[name], p[src])
        if self.refine:
            route(s["X"], p["reg"])  # the observations, each in its own slot
        for b in range(self.n_bank):
            for name, src in (("E_x", "x"), ("E_P", "P"), ("E_q", "q")):
                route(s[f"{name}{b}"], p[src])
                decay[s[f"{name}{b}"]] = self.lams[b]
        return decay, drive  # the logits: A = 1, B = 0 (constants from θ_0)

    def check_steps(self, n_steps: int) -> None:
        check_grid(self.system, "lsq", n_steps)

    def init_weights(self, generator: torch.Generator | None = None) -> Tensor:
        theta = torch.zeros(self.n_weights)
        rows, cols = self.tri
        theta[self.slots["M"]] = PRIOR_WEIGHT * (rows == cols).float()
        return theta  # mixture logits 0: every filter weighs the same

    def learnable_init(self) -> Tensor:
        """Training moves the mixture logits (and with `learn_prior` the pseudo-observations
        of the coefficients in M and v); the accumulated sums start at zero."""
        mask = torch.zeros(self.n_weights, dtype=torch.bool)
        for name in ("M", "v", "logits") if self.learn_prior else ("logits",):
            mask[self.slots[name]] = True
        return mask

    # -- the recurrence's input --------------------------------------------------------------
    def inputs(self, tau: Tensor, x: Tensor) -> Tensor:
        """ψ of windows ``x (..., 3, S)`` at normalised times ``tau (..., 3)``."""
        dtype = x.dtype
        x = x.double()
        t = self.t_start + tau.double() * self.t_length  # (..., 3)
        form, scale, nu = self.form, self.scale, self.nu
        F, g = form.features(t, x)  # (..., 3, S, K), (..., 3, S)
        h1, h2 = t[..., 1] - t[..., 0], t[..., 2] - t[..., 1]  # (...)
        full = ((h1 > 0) & (h2 > 0)).double()  # a whole window (x_{t-2} exists)
        last = (h2 > 0).double()  # the last step exists (t >= 1)
        h = 0.5 * (h1 + h2)
        w3 = torch.stack((h / 3, 4 * h / 3, h / 3), -1)  # Simpson over [t-2, t]
        # ∫ over the last step: 3-point rule, or the trapezoid when x_{t-2} is missing
        w1 = torch.where(
            full.bool().unsqueeze(-1),
            torch.stack((-h2 / 12, 8 * h2 / 12, 5 * h2 / 12), -1),
            torch.stack((0 * h2, h2 / 2, h2 / 2), -1),
        )
        centre, half = form.centre.to(x), form.half.to(x)
        unit = (nu / scale).unsqueeze(-1)  # (S, 1): equations in O(1) units

        def integral(w):  # Σ_j w_j F_j, Σ_j w_j g_j
            return (w[..., :, None, None] * F).sum(-3), (w[..., :, None] * g).sum(-2)

        F3, g3 = integral(w3)  # (..., S, K), (..., S)
        Phi = F3 * half * unit  # (..., S, K)
        r = (x[..., 2, :] - x[..., 0, :] - g3 - (F3 @ centre)) * unit[..., 0]  # (..., S)
        M = (Phi.mT @ Phi)[..., self.tri[0], self.tri[1]] * full.unsqueeze(-1)  # (..., tri)
        v = (Phi.mT @ r.unsqueeze(-1)).squeeze(-1) * full.unsqueeze(-1)  # (..., K)
        F1, g1 = integral(w1)
        P = F1 * half * unit * last[..., None, None]  # (..., S, K)
        q = (g1 + F1 @ centre) * unit[..., 0] * last.unsqueeze(-1)  # (..., S)
        xs = x[..., 2, :] / scale * last.unsqueeze(-1)
        parts = [M, v, last.unsqueeze(-1), P.flatten(-2), q, xs]
        if self.refine:
            parts.append(self._register_input(t, x, full, last))
        return torch.cat(parts, -1).to(dtype)

    def _register_input(self, t: Tensor, x: Tensor, full: Tensor, last: Tensor) -> Tensor:
        """ψ's register part ``(..., W·S)``: x_t in the slots of step t (and x_0 in those of
        step 0 with the first window, whose x_{t-1} is x_0); steps past W: nothing."""
        W = self.window
        k = torch.round((t[..., 2] - self.t_start) / self.h_sys).long()  # (...) step of x_t
        hot = torch.nn.functional.one_hot(k.clamp(0, W), W + 1)[..., :W].to(x)  # (..., W)
        reg = hot.unsqueeze(-1) * (x[..., 2, :] * last.unsqueeze(-1)).unsqueeze(-2)
        first = (last * (1 - full)).unsqueeze(-1)  # (..., 1): the window of step 1
        reg[..., 0, :] += x[..., 1, :] * first
        return reg.flatten(-2)

    # -- the root ----------------------------------------------------------------------------
    def solve(self, theta: Tensor) -> Tensor:
        """Return the normalised coefficients z ``(B, K)`` float64: c = centre + half·z."""
        K = self.form.n
        vech = theta[:, self.slots["M"]].double()  # (B, tri)
        M = vech.new_zeros(len(theta), K, K)
        M[:, self.tri[0], self.tri[1]] = vech
        M = M + M.mT - torch.diag_embed(M.diagonal(dim1=-2, dim2=-1))  # symmetric
        v = theta[:, self.slots["v"]].double()
        eye = torch.eye(K, dtype=M.dtype, device=M.device)
        floor = 1e-9 * M.diagonal(dim1=-2, dim2=-1).abs().mean(-1) + 1e-12  # (B,)
        return torch.linalg.solve(M + floor[:, None, None] * eye, v.unsqueeze(-1)).squeeze(-1)

    def coefficients(self, theta: Tensor) -> Tensor:
        """Return the fitted coefficients c ``(B, K)`` float64, within the fit's bounds (the
        refined ones where `finish_context` has written them)."""
        z = self.solve(theta)
        c = self.form.clamp(self.form.centre.to(z) + self.form.half.to(z) * z)
        return self._refined(theta, c, "c_fit")

    def _refined(self, theta: Tensor, value: Tensor, slot: str) -> Tensor:
        """`value`, replaced by θ's `slot` (c_fit or x_fit, float64) where θ was refined."""
        if not self.refine:
            return value
        fitted = theta[:, self.slots["fitted"]].detach() > 0.5  # (B, 1)
        pair = theta[:, self.slots[slot]].detach().double()
        n = pair.shape[-1] // 2
        return torch.where(fitted, pair[:, :n] + pair[:, n:], value)

    def finish_context(self, theta: Tensor) -> Tensor:
        """With `refine`: the output-error refinement of the context held in θ's register
        (`identify.refine_output_error`), written into θ's c_fit, x_fit and fitted slots."""
        if not self.refine:
            return theta
        th = theta.detach().double()
        B, S, W = len(theta), self.form.system.state_dim, self.window
        n = th[:, self.slots["n"]].squeeze(-1)  # fed steps: x_0..x_n are in the register
        L = int(n.max().round()) + 1
        if L < 3 or L > W or bool((n.round() != L - 1).any()):
            return theta  # a context longer than the register, or ragged: no refinement
        ys = th[:, self.slots["X"]].view(B, W, S)[:, :L]  # (B, L, S) as fed
        t = self.t_start + self.h_sys * torch.arange(L, dtype=th.dtype, device=th.device)
        if not output_error_applies(self.system, t):
            return theta  # chaos over too long a context: the least-squares fit stands
        c0 = self.coefficients(theta)
        weights = 1.0 / self.scale.to(th) ** 2
        c, path = refine_output_error(self.form, t, ys, c0, weights, iterations=self.refine)
        out = theta.clone()
        out[:, self.slots["c_fit"]] = _pair(c, theta.dtype)
        out[:, self.slots["x_fit"]] = _pair(path[:, -1], theta.dtype)
        out[:, self.slots["fitted"]] = 1.0
        return out

    def smoothed_state(self, theta: Tensor, z: Tensor) -> Tensor:
        """Return x̂ ``(B, S)`` float64 at the time of the last fed value (mixture over λ).

        Only the mixture logits carry gradients: the sums in θ are data, never trained."""
        th = theta.detach().double()
        B, S, K = len(theta), self.form.system.state_dim, self.form.n
        n = th[:, self.slots["n"]]  # (B, 1)
        C = th[:, self.slots["C_P"]].view(B, S, K) @ z.unsqueeze(-1)  # (B, S, 1)
        C = C.squeeze(-1) + th[:, self.slots["C_q"]]  # (B, S): ∫ f from x_0, normalised
        logits = theta[:, self.slots["logits"]].double().view(B, self.n_bank, S)
        weights = torch.softmax(logits, 1)  # (B, n_bank, S)
        out = 0.0
        for b in range(self.n_bank):
            lam = float(self.lams[b])
            Ex = th[:, self.slots[f"E_x{b}"]]
            if lam == 0.0:
                est = Ex
            else:
                E = th[:, self.slots[f"E_P{b}"]].view(B, S, K) @ z.unsqueeze(-1)
                E = E.squeeze(-1) + th[:, self.slots[f"E_q{b}"]]  # (B, S)
                lam_n = lam**n  # (B, 1)
                Z = ((1 - lam_n) / (1 - lam)).clamp_min(1e-12)
                est = (Ex + (lam * E - lam_n * C) / ((1 - lam) * self.nu)) / Z
            out = out + weights[:, b] * est
        return out * self.scale.to(th)

    def forward(
        self, theta: Tensor, tau: Tensor, y_prev: Tensor, dt: float
    ) -> tuple[Tensor, Tensor | None]:
        # the normal equations carry gradients only when their prior is learned
        z = self.solve(theta if self.learn_prior else theta.detach())
        c = self.form.clamp(self.form.centre.to(z) + self.form.half.to(z) * z)  # (B, K)
        c = self._refined(theta, c, "c_fit")
        t0 = self.t_start + tau.double() * self.t_length - dt  # (B,) time of y_prev
        n = theta[:, self.slots["n"]].double().squeeze(-1)  # fed steps: last at t_start + n h
        first = (n >= 1) & ((t0 - (self.t_start + n * self.h_sys)).abs() < 0.5 * dt)
        # the step right after the last fed value starts from the filtered state
        smoothed = self._refined(theta, self.smoothed_state(theta, z), "x_fit")
        start = torch.where(first[:, None], smoothed, y_prev.double())
        start = self.system.project(start)  # a noisy start may lie outside the state domain
        n_sub = self.substeps
        if n_sub == "auto" and torch.is_grad_enabled():  # training: from the test ranges
            n_sub = max(1, math.ceil(abs(dt) * self.rho / STEP_RATE - 1e-9))
        elif n_sub == "auto":  # forecasting: h·‖∂f/∂y‖∞ <= STEP_RATE at the start states
            jac = lambda t, y: self.form.jacobian(t, y, c)  # noqa: E731
            n_sub = substeps_for(jac, t0, start, dt, STEP_RATE)
        mean = rk4(lambda t, y: self.form.field(t, y, c), start, dt, n_sub, t0=t0)
        return self.system.project(mean).to(y_prev.dtype), None

    def physical_params(self, theta: Tensor, tau: Tensor, y_prev: Tensor) -> dict[str, Tensor]:
        c = self.coefficients(theta)
        return dict(zip(self.names, c.to(theta.dtype).unbind(-1), strict=True))

    def learned_names(self) -> tuple[str, ...]:
        """The fitted coefficients: unknown parameters or identifiable combinations."""
        return self.names


def _pair(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x (B, n)`` float64 as ``(B, 2n)`` of `dtype`: the rounded value, then the remainder
    (their float64 sum is x to about twice the precision of `dtype`)."""
    hi = x.to(dtype)
    return torch.cat((hi, (x - hi.double()).to(dtype)), -1)
