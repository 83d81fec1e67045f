"""WARP: a linear recurrence in the weight space of a root network (Nzoyem et al. 2025).

With x_t the value fed at step t (ground truth, or the model's own previous prediction):

    θ_0 = φ(x_0)                                  hypernetwork, or a learned vector
    θ_t = A θ_{t-1} + B (x_t - x_{t-1})           (anchored: θ_t - θ_0 = A(θ_{t-1} - θ_0) + B Δx_t)
    ŷ_{t+1} = root(θ_t; τ_{t+1}, x_t, dt)         τ_{t+1} = (t + 1) / (T - 1)

A root may replace the input Δx_t by a nonlinear map ψ of the last few fed values and fix A
and B itself (`AbstractRoot.inputs`, `recurrence`; transition "prior"): θ then accumulates
sums over time of nonlinear features of the data, and the recurrence stays linear, so the
parallel scan is unchanged.

A is identity-like at init (see `transition.py`), B is zero, so at init the model ignores
its inputs and is the neural field root_{θ_0}(τ). One recurrence serves both modes: the
steps fed with ground truth (t < context) are computed together by the parallel scan and
the root is evaluated on all of them at once; the remaining steps, fed with the model's own
predictions (or, with probability `teacher_prob` per sample, the truth), run as a loop
with the same transition operator. context >= T - 1 is fully teacher-forced.

Speed (`runtime`, a `warp_phys.runtime.Runtime`): the dense products run at its `precision`
(scan.py: the identity exact, float32 sums); the forecast loop has its own backward
(`_Rollout`: one Aᵀ product per step, dL/dA batched over 32 steps, the root's gradient by
local autograd); `checkpoint_every=K` keeps only every K-th state and recomputes the rest
(time chunks of the teacher-forced scan go through `torch.utils.checkpoint`, as do the
cache-sized chunks of `prefix_chunk`); `compile_root` compiles the root's step. Nothing in
the loop reads a value back to the host, so a whole training step can be captured as a CUDA
graph. The forecast loop itself is `rollout.ForecastStep`.
"""

from __future__ import annotations

import logging
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from warp_phys.errors import UserError
from warp_phys.forecaster import AbstractForecaster, Forecast
from warp_phys.rollout import ForecastStep, Spec, _Rollout
from warp_phys.root import AbstractRoot
from warp_phys.runtime import Runtime
from warp_phys.scan import LinearOp, prepare, scan
from warp_phys.transition import TRANSITIONS, FixedDiagonal, build_transition

log = logging.getLogger(__name__)

INIT_STATES = ("hypernet", "learned")
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> compiled root


class _Trajectory(NamedTuple):
    mean: Tensor  # (B, T-1, S)
    std: Tensor | None  # (B, T-1, S)
    theta: Tensor | None  # (B, T-1, Dp) θ_t for t = 0..T-2, when asked
    fed: Tensor | None  # (B, T-1, S) x_t for t = 0..T-2, when asked


def hypernet(state_dim: int, init: Tensor) -> nn.Sequential:
    """Return the paper's φ: d -> h1 -> h2 -> Dθ, whose output starts at `init` for every x_0.

    h1 = int(2/3 d + 1/3 Dθ), h2 = int(1/3 d + 2/3 Dθ) as in the official code; the last layer
    is zero with bias `init`, so θ_0 = init until training moves it.
    """
    D = init.numel()
    h1, h2 = int(2 / 3 * state_dim + 1 / 3 * D), int(1 / 3 * state_dim + 2 / 3 * D)
    net = nn.Sequential(
        nn.Linear(state_dim, h1), nn.SiLU(), nn.Linear(h1, h2), nn.SiLU(), nn.Linear(h2, D)
    )
    with torch.no_grad():
        net[-1].weight.zero_()
        net[-1].bias.copy_(init)
    return net


class WARP(AbstractForecaster):
    """Weight-space linear recurrent forecaster (`warp_phys.forecaster`)."""

    def __init__(
        self,
        *,
        root: AbstractRoot,
        state_dim: int,
        dt: float,
        transition: str = "dense",
        anchored: bool = False,
        init_state: str = "hypernet",
        hold_after_context: bool = False,
        time_channel: bool = False,
        transition_options: dict | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        """Args:
        root: the root-network family whose flat weights are the hidden state.
        state_dim: S, number of observed states.
        dt: physical time step passed to the root (physics priors integrate over it).
        transition: "dense" (paper) | "diagonal" | "rotation" (`transition.py`) | "prior"
            (the root's own fixed recurrence, for roots that define one).
        anchored: recur on θ_t - θ_0 instead of θ_t.
        init_state: "hypernet" (θ_0 = φ(y_0), paper) | "learned" (one learned θ_0).
        hold_after_context: keep θ at θ_{context-1} during the forecast (physics priors).
        time_channel: add τ to the inputs of B (the paper's optional time channel).
        transition_options: keyword options of the transition (e.g. rotation freq_range).
        runtime: how it computes (precision, padding, scan, checkpoints, compile;
            `warp_phys.runtime`), never what.
        """
        super().__init__()
        if not isinstance(root, AbstractRoot):
            raise TypeError(
                f"root must be an AbstractRoot (see warp_phys.root); got {type(root).__name__}"
            )
        if transition not in TRANSITIONS:
            raise UserError(
                f"unknown transition {transition!r}; choose one of {', '.join(TRANSITIONS)}"
            )
        if init_state not in INIT_STATES:
            raise UserError(
                f"unknown init_state {init_state!r}; choose one of {', '.join(INIT_STATES)}"
            )
        if state_dim < 1 or not dt > 0:
            raise UserError(f"WARP needs state_dim >= 1 and dt > 0; got {state_dim}, {dt}")
        self.runtime = runtime = runtime or Runtime()
        self.root = root
        self.state_dim = state_dim
        self.dt = float(dt)
        self.anchored = anchored
        self.hold_after_context = hold_after_context
        self._finish_memo: tuple[Tensor, Tensor] | None = None  # see `_finished`
        self._compile_failed = False  # set when torch.compile of the root failed: eager
        D = root.n_weights
        self.n_weights = D
        self.padded_dim = -(-D // runtime.pad_to) * runtime.pad_to
        fixed = root.recurrence()
        if fixed is not None and transition != "prior":
            raise UserError(
                f"prior {type(root).__name__} fixes its own recurrence (A and B): set "
                f'transition = "prior" (got {transition!r})'
            )
        if fixed is None and transition == "prior":
            raise UserError(
                f'transition "prior" needs a prior that fixes its own recurrence (e.g. lsq); '
                f"{type(root).__name__} does not: choose dense, diagonal or rotation"
            )
        if fixed is not None:
            decay, drive = fixed  # (D,), (D, n_inputs)
            self.transition = FixedDiagonal(D, decay=decay)
            self.input_map = nn.Parameter(drive.detach().clone().float(), requires_grad=False)
        else:
            self.transition = build_transition(transition, D, **(transition_options or {}))
            n_in = root.n_inputs or state_dim
            self.input_map = nn.Parameter(torch.zeros(D, n_in))  # B, zero-init
        self.time_map = nn.Parameter(torch.zeros(D)) if time_channel else None
        init = root.init_weights()
        mask = root.learnable_init()
        if mask is not None:  # entries of θ_0 that stay at their initial value
            self.register_buffer("init_mask", mask.bool().clone())
            self.register_buffer("init_fixed", init.clone())
        else:
            self.init_mask = None
        if init_state == "hypernet":
            self.phi = hypernet(state_dim, init)
        else:
            self.theta0 = nn.Parameter(init.clone())

    # -- pieces of the recurrence -------------------------------------------------------
    def initial_state(self, y0: Tensor) -> Tensor:
        """Return θ_0 ``(B, Dp)`` (padded with zeros) for first states y0 ``(B, S)``."""
        if hasattr(self, "phi"):
            theta0 = self.phi(y0)  # (B, D)
        else:
            theta0 = self.theta0.expand(y0.shape[0], -1)  # (B, D)
        if self.init_mask is not None:
            theta0 = torch.where(self.init_mask, theta0, self.init_fixed)
        return F.pad(theta0, (0, self.padded_dim - self.n_weights))

    def _inputs(self, ys: Tensor, lo: int, hi: int, dtau: float) -> Tensor:
        """Return ψ_t ``(B, hi - lo, n_inputs)`` for the fed values ys ``(B, T, S)``, lo >= 1."""
        if self.root.default_drive:
            return ys[:, lo:hi] - ys[:, lo - 1 : hi - 1]  # Δx_t
        m = self.root.input_window
        idx = torch.arange(lo, hi, device=ys.device)[:, None] + torch.arange(
            1 - m, 1, device=ys.device
        )
        idx = idx.clamp_min(0)  # (k, m): windows reaching before x_0 repeat it (zero time step)
        tau = (idx * dtau).to(ys.dtype).expand(ys.shape[0], -1, -1)  # (B, k, m)
        return self.root.inputs(tau, ys[:, idx])  # ys[:, idx]: (B, k, m, S)

    def _drive(self, psi: Tensor, dtau: float) -> Tensor:
        """Return B ψ ``(..., Dp)`` for ψ ``(..., n_inputs)`` (plus the time channel's B_τ Δτ)."""
        u = F.linear(psi, self.input_map)  # (..., D)
        if self.time_map is not None:
            u = u + dtau * self.time_map
        return F.pad(u, (0, self.padded_dim - self.n_weights))

    def drive_map(self) -> Tensor:
        """Return V ``(n_inputs[+1], Dp)``: B ψ (+ B_τ Δτ) = [ψ, Δτ] V, padded (one forecast
        step's input as a low-rank update of the recurrence)."""
        V = self.input_map.mT  # (n_inputs, D)
        if self.time_map is not None:
            V = torch.cat((V, self.time_map.unsqueeze(0)), 0)  # (S + 1, D)
        return F.pad(V, (0, self.padded_dim - self.n_weights))

    def drive_rows(self, dx: Tensor, dtau: float) -> Tensor:
        """Return U = [ψ, Δτ] ``(B, n_inputs[+1])`` matching `drive_map` (ψ = Δx by default)."""
        if self.time_map is None:
            return dx
        return torch.cat((dx, dx.new_full((dx.shape[0], 1), dtau)), -1)

    def _root(self, theta: Tensor, tau: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Evaluate the root on ``theta (N, Dp)``, ``tau (N,)``, ``x (N, S)``; padding dropped."""
        return self.root(theta[:, : self.n_weights], tau, x, self.dt)

    def root_step(self, theta: Tensor, tau: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """`_root`, compiled when `runtime.compile_root` is set (eager if compilation fails)."""
        if self.runtime.compile_root and not self._compile_failed:
            fn = _COMPILED.get(self)
            if fn is None:
                fn = _COMPILED[self] = torch.compile(self._root, dynamic=False)
            try:
                return fn(theta, tau, x)
            except Exception as err:  # noqa: BLE001 - any compiler failure: run eager
                log.warning("torch.compile of the root failed (%s); running eager", err)
                self._compile_failed = True
        return self._root(theta, tau, x)

    def resolved_precision(self, device: torch.device) -> str:
        """Return the precision of the dense products on `device` ("auto" resolved)."""
        return self.runtime.resolved_precision(device)

    # -- the recurrence -------------------------------------------------------------------
    def _run(
        self,
        ys: Tensor,
        context: int,
        teacher_prob: float,
        generator,
        *,
        keep: bool = False,
        horizon: int | None = None,
    ) -> _Trajectory:
        self._check(ys, context, teacher_prob)
        B, T, S = ys.shape
        dtau = 1.0 / (T - 1)
        tau = torch.arange(1, T, device=ys.device, dtype=ys.dtype) * dtau  # τ_{t+1}, (T-1,)
        if horizon:  # stop early; τ keeps the full sequence's normalisation
            T = min(T, min(context, T - 1) + horizon)
            ys, tau = ys[:, :T], tau[: T - 1]
        op: LinearOp = self.transition.operator(self.padded_dim)
        theta0 = self.initial_state(ys[:, 0])  # (B, Dp)
        L = min(context, T - 1)  # steps t < L are fed with ground truth
        spec = Spec(ys, tau, dtau, L, teacher_prob, generator, self.resolved_precision(ys.device))
        h, theta, mean, std = self._prefix(op, spec, theta0, keep)
        if self.hold_after_context and L < T - 1 and self.root.finishes_context:
            h, theta, mean, std = self._finish_context(spec, theta0, h, theta, mean, std)
        means, stds, thetas, fed = [mean], [std], [theta], [ys[:, :L]]
        if L < T - 1:  # forecast steps, one at a time: the input depends on the prediction
            base = theta0 if self.anchored else None
            fast = self.runtime.fast_loop and not keep and not self.hold_after_context
            fast = fast and self.root.default_drive  # its backward knows ψ = Δx only
            if fast and torch.is_grad_enabled():
                params = [self.input_map, *([] if self.time_map is None else [self.time_map])]
                params += [p for p in self.root.parameters() if p.requires_grad]
                mean, std = _Rollout.apply(
                    ForecastStep(self, spec), type(op), len(op), h, mean[:, -1], base, *op,
                    *params,
                )  # fmt: skip
                means.append(mean)
                stds.append(std if std.numel() else None)
            else:
                step = ForecastStep(self, spec)
                lin = prepare(op, spec.precision)
                out = step.run(h, mean[:, -1], base, lin, lin.anchor(h), keep=keep)
                means += out.means
                stds += out.stds
                thetas += out.thetas
                fed += out.fed
        return _Trajectory(
            torch.cat(means, 1),
            None if stds[0] is None else torch.cat(stds, 1),
            torch.cat(thetas, 1) if keep else None,
            torch.cat(fed, 1) if keep else None,
        )

    def _finish_context(self, spec: Spec, theta0: Tensor, h: Tensor, theta, mean, std):
        """Replace θ_{L-1} by the root's `finish_context` of it (held through the forecast)
        and redo the first forecast step's prediction from it. Return h, θ (when kept), mean
        and std as `_prefix` does."""
        base = theta0 if self.anchored else None
        B, L = spec.ys.shape[0], spec.L
        last = h if base is None else base + h  # θ_{L-1} (B, Dp)
        done = self._finished(last[:, : self.n_weights])
        done = F.pad(done, (0, self.padded_dim - self.n_weights))
        m, s = self._root(done, spec.tau[L - 1].expand(B), spec.ys[:, L - 1])
        mean = torch.cat((mean[:, :-1], m.unsqueeze(1)), 1)
        std = None if std is None else torch.cat((std[:, :-1], s.unsqueeze(1)), 1)
        theta = None if theta is None else torch.cat((theta[:, :-1], done.unsqueeze(1)), 1)
        return (done if base is None else done - base), theta, mean, std

    def _finished(self, theta: Tensor) -> Tensor:
        """The root's `finish_context` of θ ``(B, n_weights)``. Outside autograd the last one
        is remembered: it is a function of θ alone, and evaluation asks for the forecast and
        then the parameters of the same contexts (an output-error fit each time otherwise)."""
        if torch.is_grad_enabled():
            return self.root.finish_context(theta)
        memo = self._finish_memo
        same = memo is not None and memo[0].shape == theta.shape
        if same and memo[0].device == theta.device and torch.equal(memo[0], theta):
            return memo[1]
        done = self.root.finish_context(theta)
        self._finish_memo = (theta.clone(), done)
        return done

    def _prefix(self, op: LinearOp, spec: Spec, theta0: Tensor, keep: bool):
        """Run the teacher-forced steps t < L by the parallel scan. Return the state h_{L-1}
        (θ, or δ = θ - θ_0 when anchored) ``(B, Dp)``, θ_0..θ_{L-1} ``(B, L, Dp)`` when
        `keep`, and the root's mean and std (or None) ``(B, L, S)``."""
        L = spec.L
        K = self.runtime.chunk_for(spec.ys.device, spec.ys.shape[0] * L * self.padded_dim)
        if not K or keep or L <= K or not torch.is_grad_enabled():
            theta, h, mean, std = self._tf_chunk(op, spec, theta0, 0, L, None)
            return h, theta, mean, std
        means, stds, h = [], [], None
        for t0 in range(0, L, K):  # time chunks, recomputed in the backward

            def chunk(h_prev, t0=t0):
                return self._tf_chunk(op, spec, theta0, t0, min(t0 + K, L), h_prev)[1:]

            # no random draws inside: not saving the RNG state keeps CUDA-graph capture legal
            h, mean, std = checkpoint(chunk, h, use_reentrant=False, preserve_rng_state=False)
            means.append(mean)
            stds.append(std)
        return h, None, torch.cat(means, 1), None if stds[0] is None else torch.cat(stds, 1)

    def _tf_chunk(self, op: LinearOp, spec: Spec, theta0: Tensor, t0: int, t1: int, h_prev):
        """Teacher-forced steps t0 <= t < t1 from the state h_{t0-1} (None when t0 = 0).
        Return θ ``(B, k, Dp)``, h_{t1-1} ``(B, Dp)``, mean and std ``(B, k, S)``."""
        ys = spec.ys
        B, _, S = ys.shape
        lo = max(t0, 1)
        u = self._drive(self._inputs(ys, lo, t1, spec.dtau), spec.dtau)  # B ψ_t, t in [lo, t1)
        if t0 == 0:  # θ_0 enters as the first input (δ_0 = 0): no second (B, k, Dp) copy
            u = F.pad(u, (0, 0, 1, 0)) if self.anchored else torch.cat((theta0.unsqueeze(1), u), 1)
        h = scan(op, u, h_prev, method=self.runtime.scan_method, precision=spec.precision)
        theta = theta0.unsqueeze(1) + h if self.anchored else h
        k = t1 - t0
        mean, std = self._root(
            theta.reshape(B * k, -1), spec.tau[t0:t1].repeat(B), ys[:, t0:t1].reshape(B * k, S)
        )
        return theta, h[:, -1], mean.view(B, k, S), None if std is None else std.view(B, k, S)

    def _check(self, ys: Tensor, context: int, teacher_prob: float) -> None:
        if ys.dim() != 3 or ys.shape[-1] != self.state_dim or ys.shape[1] < 2:
            raise UserError(
                f"WARP expects ys (batch, time >= 2, {self.state_dim}); got shape {tuple(ys.shape)}"
            )
        if context < 1:
            raise UserError(
                f"context must be at least 1 (the first state is always given); got {context}"
            )
        if not 0.0 <= teacher_prob <= 1.0:
            raise UserError(f"teacher_prob must lie in [0, 1]; got {teacher_prob}")
        self.root.check_steps(ys.shape[1])

    # -- public API -----------------------------------------------------------------------
    def forward(
        self,
        ys: Tensor,
        *,
        context: int,
        teacher_prob: float = 0.0,
        generator: torch.Generator | None = None,
        horizon: int | None = None,
    ) -> Forecast:
        """Predict ys[:, 1:] from ys ``(B, T, S)``: index t of the result predicts ys[:, t+1].

        Steps t < context are fed the truth; later steps the model's own previous mean, or
        (per sample, with probability `teacher_prob`) the truth. context >= T - 1 is fully
        teacher-forced and runs as one parallel scan. With `horizon`, stop `horizon` steps
        after the context (predictions of ys[:, 1 : context + horizon]).
        """
        traj = self._run(ys, context, teacher_prob, generator, horizon=horizon)
        return Forecast(traj.mean, traj.std)

    def theta_trajectory(
        self, ys: Tensor, *, context: int | None = None, teacher_prob: float = 0.0, generator=None
    ) -> Tensor:
        """Return θ_t for t = 0..T-2, ``(B, T-1, Dθ)`` (teacher-forced when context is None)."""
        context = ys.shape[1] if context is None else context
        return self._run(ys, context, teacher_prob, generator, keep=True).theta[
            ..., : self.n_weights
        ]

    def physical_params(self, ys: Tensor, context: int) -> dict[str, Tensor]:
        """Return the root's physical parameters along the rollout, each ``(B, T-1)``.

        Index t is read from θ_t (with τ_{t+1} and the fed x_t). Empty for black-box roots.
        """
        if type(self.root).physical_params is AbstractRoot.physical_params:
            return {}  # a black-box root: no need to run the model
        (B, T1), args = self._per_step(ys, context)
        return {k: v.view(B, T1) for k, v in self.root.physical_params(*args).items()}

    def penalty(self, ys: Tensor) -> Tensor | None:
        """Return the root's penalty (e.g. a hybrid residual's size) along the teacher-forced
        trajectory, ``(B, T-1)``, or None when the root has none."""
        if type(self.root).penalty is AbstractRoot.penalty:
            return None  # no penalty: no need to run the model
        (B, T1), args = self._per_step(ys, ys.shape[1])
        return self.root.penalty(*args).view(B, T1)

    def learned_names(self) -> tuple[str, ...] | None:
        return self.root.learned_names()

    def _per_step(self, ys: Tensor, context: int) -> tuple[tuple[int, int], tuple]:
        """Return (B, T-1) and the root's per-step arguments θ_t ``(N, Dθ)``, τ_{t+1} ``(N,)``,
        x_t ``(N, S)`` along the rollout, N = B (T-1)."""
        traj = self._run(ys, context, 0.0, None, keep=True)
        B, T1, S = traj.fed.shape
        tau = torch.arange(1, T1 + 1, device=ys.device, dtype=ys.dtype) / T1  # (T-1,)
        theta = traj.theta.reshape(B * T1, -1)[:, : self.n_weights]
        return (B, T1), (theta, tau.repeat(B), traj.fed.reshape(B * T1, S))
