"""WARP: a linear recurrence in the weight space of a root network (Nzoyem et al. 2025).

With x_t the value fed at step t (ground truth, or the model's own previous prediction):

    θ_0 = φ(x_0)                                  hypernetwork, or a learned vector
    θ_t = A θ_{t-1} + B (x_t - x_{t-1})           (anchored: θ_t - θ_0 = A(θ_{t-1} - θ_0) + B Δx_t)
    ŷ_{t+1} = root(θ_t; τ_{t+1}, x_t, dt)         τ_{t+1} = (t + 1) / (T - 1)

A is identity-like at init (see `transition.py`), B is zero, so at init the model ignores
its inputs and is the neural field root_{θ_0}(τ). One recurrence serves both modes: the
steps fed with ground truth (t < context) are computed together by the parallel scan and
the root is evaluated on all of them at once; the remaining steps, fed with the model's own
predictions (or, with probability `teacher_prob` per sample, the truth), run as a loop
with the same transition operator. context >= T - 1 is fully teacher-forced.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from warp_phys.errors import UserError
from warp_phys.root import AbstractRoot
from warp_phys.scan import METHODS, LinearOp, scan
from warp_phys.transition import TRANSITIONS, build_transition

INIT_STATES = ("hypernet", "learned")


class Forecast(NamedTuple):
    """Predictions of ys[:, 1:]: mean ``(B, T-1, S)``, std ``(B, T-1, S)`` or None."""

    mean: Tensor
    std: Tensor | None


class _Trajectory(NamedTuple):
    mean: Tensor  # (B, T-1, S)
    std: Tensor | None  # (B, T-1, S)
    theta: Tensor | None  # (B, T-1, Dp) θ_t for t = 0..T-2, when asked
    fed: Tensor | None  # (B, T-1, S) x_t for t = 0..T-2, when asked


def feed(truth: Tensor, own: Tensor, p: float, generator: torch.Generator | None) -> Tensor:
    """Return the value fed at a forecast step ``(B, S)``: the own prediction, or per sample
    with probability p the truth (no random draw when p is 0 or 1)."""
    if p <= 0:
        return own
    if p >= 1:
        return truth
    dev = generator.device if generator is not None else truth.device
    mask = torch.rand(truth.shape[0], generator=generator, device=dev).to(truth.device) < p  # (B,)
    return torch.where(mask.unsqueeze(-1), truth, own)


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


class WARP(nn.Module):
    """Weight-space linear recurrent forecaster (the forecaster interface of CONTRACTS.md)."""

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
        pad_to: int = 1,
        time_channel: bool = False,
        transition_options: dict | None = None,
        scan_method: str = "auto",
    ) -> None:
        """Args:
        root: the root-network family whose flat weights are the hidden state.
        state_dim: S, number of observed states.
        dt: physical time step passed to the root (physics priors integrate over it).
        transition: "dense" (paper) | "diagonal" | "rotation" (`transition.py`).
        anchored: recur on θ_t - θ_0 instead of θ_t.
        init_state: "hypernet" (θ_0 = φ(y_0), paper) | "learned" (one learned θ_0).
        hold_after_context: keep θ at θ_{context-1} during the forecast (physics priors).
        pad_to: pad Dθ up to a multiple of this (fast matrix sizes on GPUs); invisible.
        time_channel: add τ to the inputs of B (the paper's optional time channel).
        transition_options: keyword options of the transition (e.g. rotation freq_range).
        scan_method: "auto" | "sequential" | "chunked" | "doubling" (`scan.py`).
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
        if scan_method not in METHODS:
            raise UserError(
                f"unknown scan_method {scan_method!r}; choose one of {', '.join(METHODS)}"
            )
        if int(pad_to) < 1 or state_dim < 1 or not dt > 0:
            raise UserError(
                f"WARP needs pad_to >= 1, state_dim >= 1 and dt > 0; got pad_to={pad_to}, "
                f"state_dim={state_dim}, dt={dt}"
            )
        self.root = root
        self.state_dim = state_dim
        self.dt = float(dt)
        self.anchored = anchored
        self.hold_after_context = hold_after_context
        self.scan_method = scan_method
        D = root.n_weights
        self.n_weights = D
        self.padded_dim = -(-D // int(pad_to)) * int(pad_to)
        self.transition = build_transition(transition, D, **(transition_options or {}))
        self.input_map = nn.Parameter(torch.zeros(D, state_dim))  # B, zero-init
        self.time_map = nn.Parameter(torch.zeros(D)) if time_channel else None
        init = root.init_weights()
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
        return F.pad(theta0, (0, self.padded_dim - self.n_weights))

    def _drive(self, dx: Tensor, dtau: float) -> Tensor:
        """Return B Δx ``(..., Dp)`` for Δx ``(..., S)`` (plus the time channel's B_τ Δτ)."""
        u = F.linear(dx, self.input_map)  # (..., D)
        if self.time_map is not None:
            u = u + dtau * self.time_map
        return F.pad(u, (0, self.padded_dim - self.n_weights))

    def _root(self, theta: Tensor, tau: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Evaluate the root on ``theta (N, Dp)``, ``tau (N,)``, ``x (N, S)``; padding dropped."""
        return self.root(theta[:, : self.n_weights], tau, x, self.dt)

    # -- the recurrence -------------------------------------------------------------------
    def _run(
        self, ys: Tensor, context: int, teacher_prob: float, generator, *, keep: bool = False
    ) -> _Trajectory:
        self._check(ys, context, teacher_prob)
        B, T, S = ys.shape
        dtau = 1.0 / (T - 1)
        tau = torch.arange(1, T, device=ys.device, dtype=ys.dtype) * dtau  # τ_{t+1}, (T-1,)
        op: LinearOp = self.transition.operator(self.padded_dim)
        theta0 = self.initial_state(ys[:, 0])  # (B, Dp)
        L = min(context, T - 1)  # steps t < L are fed with ground truth

        # teacher-forced steps t < L, all at once. θ_0 enters as the first input (or δ_0 = 0),
        # so the scan returns the whole θ trajectory without a second (B, L, Dp) copy
        u = self._drive(ys[:, 1:L] - ys[:, : L - 1], dtau)  # (B, L-1, Dp): B Δy_t, t = 1..L-1
        if self.anchored:
            delta = scan(op, F.pad(u, (0, 0, 1, 0)), method=self.scan_method)  # (B, L, Dp)
            theta = theta0.unsqueeze(1) + delta
            delta = delta[:, -1]
        else:
            theta = scan(op, torch.cat((theta0.unsqueeze(1), u), 1), method=self.scan_method)
        mean, std = self._root(
            theta.reshape(B * L, -1), tau[:L].repeat(B), ys[:, :L].reshape(B * L, S)
        )
        means, stds = [mean.view(B, L, S)], [None if std is None else std.view(B, L, S)]
        thetas, fed = [theta], [ys[:, :L]]

        # forecast steps, one at a time: the input depends on the previous prediction
        th, x_prev, m = theta[:, -1], ys[:, L - 1], means[0][:, -1]
        for t in range(L, T - 1):
            x = feed(ys[:, t], m, teacher_prob, generator)  # (B, S)
            if not self.hold_after_context:
                u = self._drive(x - x_prev, dtau)  # (B, Dp)
                if self.anchored:
                    delta = op.apply(delta) + u
                    th = theta0 + delta
                else:
                    th = op.apply(th) + u
            m, s = self._root(th, tau[t].expand(B), x)
            means.append(m.unsqueeze(1))
            stds.append(None if s is None else s.unsqueeze(1))
            if keep:
                thetas.append(th.unsqueeze(1))
                fed.append(x.unsqueeze(1))
            x_prev = x
        return _Trajectory(
            torch.cat(means, 1),
            None if stds[0] is None else torch.cat(stds, 1),
            torch.cat(thetas, 1) if keep else None,
            torch.cat(fed, 1) if keep else None,
        )

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

    # -- public API -----------------------------------------------------------------------
    def forward(
        self,
        ys: Tensor,
        *,
        context: int,
        teacher_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Forecast:
        """Predict ys[:, 1:] from ys ``(B, T, S)``: index t of the result predicts ys[:, t+1].

        Steps t < context are fed the truth; later steps the model's own previous mean, or
        (per sample, with probability `teacher_prob`) the truth. context >= T - 1 is fully
        teacher-forced and runs as one parallel scan.
        """
        traj = self._run(ys, context, teacher_prob, generator)
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
            return {}
        (B, T1), args = self._per_step(ys, context)
        return {k: v.view(B, T1) for k, v in self.root.physical_params(*args).items()}

    def penalty(self, ys: Tensor) -> Tensor | None:
        """Return the root's penalty (e.g. a hybrid residual's size) along the teacher-forced
        trajectory, ``(B, T-1)``, or None when the root has no `penalty`."""
        fn = getattr(self.root, "penalty", None)
        if fn is None:
            return None
        (B, T1), args = self._per_step(ys, ys.shape[1])
        return fn(*args).view(B, T1)

    def _per_step(self, ys: Tensor, context: int) -> tuple[tuple[int, int], tuple]:
        """Return (B, T-1) and the root's per-step arguments θ_t ``(N, Dθ)``, τ_{t+1} ``(N,)``,
        x_t ``(N, S)`` along the rollout, N = B (T-1)."""
        traj = self._run(ys, context, 0.0, None, keep=True)
        B, T1, S = traj.fed.shape
        tau = torch.arange(1, T1 + 1, device=ys.device, dtype=ys.dtype) / T1  # (T-1,)
        theta = traj.theta.reshape(B * T1, -1)[:, : self.n_weights]
        return (B, T1), (theta, tau.repeat(B), traj.fed.reshape(B * T1, S))

    def n_params(self) -> int:
        """Return the number of trainable parameters (padding not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
