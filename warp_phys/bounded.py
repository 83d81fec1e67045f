"""Physical parameters read from θ, soft-bounded around a system's declared ranges; the RK4
stepper and the checks the physics priors (`ode`, `hybrid`) share.

    params = BoundedParams(system, prior="ode", learn=None, fixed=None, inputs="const",
                           width=16, depth=1, spread=2.0, state_scale=scale)
    p, extra = params(theta, tau, y_prev)        # (B, P) in system order, (B, n_extra)

Learned parameters come from a small MLP with flat weights θ, soft-bounded:

    positive p:  p = c · exp(s · tanh(r)),    c = geometric mean of the train range
    signed p:    p = c + w · s · tanh(r),     c = midpoint, w = half-width of the range

(r the raw network output, s = `spread`); the others are held at given values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from warp_phys.errors import UserError
from warp_phys.integrate import INTEGRATORS
from warp_phys.physics import reference
from warp_phys.root import FlatMLP
from warp_phys.system import System

INPUTS = ("const", "tau", "tau_y")  # what the parameter network sees
STEP_RATE = 1.0  # auto substeps keep h·ρ(∂f/∂y) <= this (RK4 is stable up to ~2.8)
DEFAULT_SPREAD = 2.0  # soft-bound half-width: a factor e^2 ≈ 7.4 either side for positive
STD_SHIFT = -3.0  # predict_std: std = scale · softplus(raw + shift); 5% of scale at init
STD_FLOOR = 1e-4  # lower bound of a predicted std, as the blackbox prior and the paper's code
MAX_CORNERS = 8  # up to 2^8 corners of the parameter box; beyond, 256 random points


# -- system and reference states ---------------------------------------------------------
def state_scale_of(system: System, state_scale) -> Tensor:
    """Resolve the `state_scale` option: "auto" (reference max |y|), None (ones) or numbers."""
    if isinstance(state_scale, str) and state_scale == "auto":
        return reference(system).scale.clone()
    if state_scale is None:
        return torch.ones(system.state_dim, dtype=torch.float64)
    scale = torch.as_tensor(state_scale, dtype=torch.float64).reshape(-1)
    if scale.numel() != system.state_dim or not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise UserError(
            f"state_scale must be 'auto', None or {system.state_dim} positive numbers (one per "
            f"state {', '.join(system.state)}); got {state_scale!r}"
        )
    return scale


# -- the parameter network --------------------------------------------------------------
def select_params(
    system: System,
    prior: str,
    learn: Sequence[str] | None,
    fixed: Mapping[str, float] | None,
    drop: Sequence[str],
) -> tuple[tuple[str, ...], dict[str, float]]:
    """Validate the learn/fixed/drop options; return the learned names and the held values.

    Default `learn`: every parameter with a train range that is neither fixed nor dropped.
    Held values: `fixed` entries, 0 for dropped parameters, else the system's default.
    """
    names, fixed, drop = system.param_names, dict(fixed or {}), list(drop)
    for what, given in (("learn", learn or ()), ("fixed", fixed), ("drop", drop)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise UserError(
                f"prior {prior!r}: {what} names unknown parameters {unknown} of system "
                f"{system.name!r}; its parameters are {', '.join(names)}"
            )
    if learn is None:
        ranged = [n for n in names if system.params[n].train is not None]
        learn = [n for n in ranged if n not in fixed and n not in drop]
    groups = {"learn": set(learn), "fixed": set(fixed), "drop": set(drop)}
    for a, b in (("learn", "fixed"), ("learn", "drop"), ("fixed", "drop")):
        both = sorted(groups[a] & groups[b])
        if both:
            raise UserError(f"prior {prior!r}: parameters {both} are in both {a} and {b}; pick one")
    held = {
        n: 0.0 if n in drop else float(fixed.get(n, system.params[n].default))
        for n in names
        if n not in learn
    }
    return tuple(learn), held


def soft_bound(system: System, prior: str, name: str, spread) -> tuple[float, float]:
    """Return (centre, radius) of ``u = centre + radius·tanh(raw)`` for parameter `name`.

    Positive parameters live in log space: centre = log of the geometric mean of the train
    range, radius = spread. Signed ones: centre = midpoint, radius = spread · half-width.
    Without a train range the centre is the default (half-width |default|, or 1).
    """
    s = spread.get(name, DEFAULT_SPREAD) if isinstance(spread, Mapping) else spread
    if not (isinstance(s, int | float) and math.isfinite(s) and s > 0):
        raise UserError(f"prior {prior!r}: spread of {name!r} must be a positive number; got {s!r}")
    p = system.params[name]
    lo, hi = p.train if p.train is not None else (p.default, p.default)
    if p.is_positive:
        return 0.5 * (math.log(lo) + math.log(hi)), float(s)
    return 0.5 * (lo + hi), float(s) * (0.5 * (hi - lo) or abs(p.default) or 1.0)


class BoundedParams(nn.Module):
    """θ -> the full parameter vector ``(B, P)`` of a system; learned entries soft-bounded.

    Learned parameters come from an MLP (flat weights θ, input set by `inputs`); the others
    are held (see `select_params`).
    """

    def __init__(
        self,
        system: System,
        *,
        prior: str,
        learn: Sequence[str] | None,
        fixed: Mapping[str, float] | None,
        drop: Sequence[str] = (),
        inputs: str,
        width: int,
        depth: int,
        spread: float | Mapping[str, float],
        state_scale: Tensor,
        n_extra: int = 0,
    ) -> None:
        super().__init__()
        if inputs not in INPUTS:
            raise UserError(
                f"prior {prior!r}: inputs must be one of {', '.join(INPUTS)}; got {inputs!r}"
            )
        if not (isinstance(width, int) and width >= 1 and isinstance(depth, int) and depth >= 0):
            raise UserError(
                f"prior {prior!r}: width must be >= 1 and depth >= 0; got {width}, {depth}"
            )
        self.system, self.inputs = system, inputs
        self.learn, held = select_params(system, prior, learn, fixed, drop)
        bounds = [soft_bound(system, prior, n, spread) for n in self.learn]
        positive = [system.params[n].is_positive for n in self.learn]
        slots = list(self.learn) + list(held)  # learned first, then held, -> system order:
        order = [slots.index(n) for n in system.param_names]
        L = len(self.learn)
        self.register_buffer("centre", torch.tensor([c for c, _ in bounds]).reshape(L), False)
        self.register_buffer("radius", torch.tensor([r for _, r in bounds]).reshape(L), False)
        self.register_buffer("positive", torch.tensor(positive, dtype=torch.bool).reshape(L), False)
        self.register_buffer("held", torch.tensor(list(held.values())).reshape(-1), False)
        self.register_buffer("order", torch.tensor(order, dtype=torch.long), False)
        self.register_buffer("scale", state_scale.float(), False)  # (S,)
        n_in = {"const": 1, "tau": 1, "tau_y": 1 + system.state_dim}[inputs]
        self.n_out = L + n_extra  # bounded parameters, then raw extra outputs (e.g. a std)
        self.mlp = FlatMLP([n_in, *[width] * depth, self.n_out]) if self.n_out else None
        self.n_weights = self.mlp.n_weights if self.mlp else 0
        self.n_last = self.n_out * ((width if depth else n_in) + 1)  # last layer's W and b

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """Return weights ``(n_weights,)`` for which every learned parameter is at its centre."""
        if self.mlp is None:
            return torch.zeros(0)
        theta = self.mlp.init(generator)
        theta[theta.numel() - self.n_last :] = 0.0  # last layer zero: raw output 0
        return theta

    def _bound(self, raw: Tensor) -> Tensor:
        u = self.centre.to(raw) + self.radius.to(raw) * torch.tanh(raw)  # (B, L)
        # exp only where positive, so that a large signed u never yields inf (and NaN grads)
        return torch.where(self.positive, torch.exp(torch.where(self.positive, u, 0.0)), u)

    def bounds(self) -> tuple[Tensor, Tensor]:
        """Return the (low, high) values the learned parameters approach, each ``(L,)``."""
        ones = torch.ones(len(self.learn), dtype=torch.float64)
        return self._bound(-1e3 * ones), self._bound(1e3 * ones)

    def centre_values(self) -> Tensor:
        """Return the full parameter vector ``(1, P)`` float64 with learned ones at centre."""
        return self.full(self._bound(torch.zeros(1, len(self.learn), dtype=torch.float64)))

    def full(self, learned: Tensor) -> Tensor:
        """Assemble ``learned (B, L)`` with the held values into ``(B, P)`` in system order."""
        held = self.held.to(learned).expand(learned.shape[0], -1)  # (B, P - L)
        return torch.cat((learned, held), -1)[:, self.order]  # (B, P)

    def forward(self, theta: Tensor, tau: Tensor, y_prev: Tensor) -> tuple[Tensor, Tensor]:
        """Return the parameters ``(B, P)`` θ ``(B, n_weights)`` encodes, and the extra
        raw outputs ``(B, n_extra)``."""
        B = theta.shape[0]
        if self.mlp is None:
            return self.full(theta.new_zeros(B, 0)), theta.new_zeros(B, 0)
        if self.inputs == "const":
            x = theta.new_ones(B, 1)  # (B, 1)
        elif self.inputs == "tau":
            x = tau.to(theta).reshape(B, 1)  # (B, 1)
        else:
            y = y_prev.to(theta) / self.scale.to(theta)  # (B, S) in O(1) units
            x = torch.cat((tau.to(theta).reshape(B, 1), y), -1)  # (B, 1 + S)
        raw = self.mlp(theta, x)  # (B, L + n_extra)
        L = len(self.learn)
        return self.full(self._bound(raw[:, :L])), raw[:, L:]

    def weights_for(self, values: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return θ ``(B, n_weights)`` whose network outputs ``values (B, P)`` (learned entries).

        The last layer's weights are zero and its bias holds the inverse soft bound, so this
        is exact for every `inputs`; values outside the bounds are clipped to just inside.
        """
        theta = self.init(generator).to(values).expand(values.shape[0], -1).clone()  # (B, D)
        if self.mlp is None:
            return theta
        idx = [self.system.param_names.index(n) for n in self.learn]
        v = values[:, idx]  # (B, L)
        u = torch.where(self.positive, torch.log(v.abs().clamp_min(1e-300)), v)
        z = ((u - self.centre.to(v)) / self.radius.to(v)).clamp(-1 + 1e-6, 1 - 1e-6)
        start = theta.shape[1] - self.n_out  # the last biases: learned ones first
        theta[:, start : start + len(self.learn)] = torch.atanh(z)
        return theta


def box_points(params: BoundedParams, generator_seed: int = 0) -> Tensor:
    """Return parameter vectors ``(C, P)`` at the corners of the bounded box and its centre."""
    lo, hi = params.bounds()  # (L,), (L,)
    L = lo.numel()
    if L <= MAX_CORNERS:
        pick = torch.tensor(list(itertools.product((0.0, 1.0), repeat=L)), dtype=torch.float64)
    else:
        gen = torch.Generator().manual_seed(generator_seed)
        pick = torch.rand(256, L, generator=gen, dtype=torch.float64)
    corners = params.full(lo + (hi - lo) * pick.reshape(-1, L))  # (C, P)
    return torch.cat((corners, params.centre_values()))  # (C + 1, P)


# -- the root --------------------------------------------------------------------------
class Stepper:
    """Fixed-step integration of ``f(t, y)`` over Δt with a substep count fixed or from ρ."""

    def __init__(self, *, prior: str, integrator: str, substeps: int | str, rho: float | None):
        if integrator not in INTEGRATORS:
            raise UserError(
                f"prior {prior!r}: integrator must be one of {', '.join(INTEGRATORS)}; "
                f"got {integrator!r}"
            )
        if not (substeps == "auto" or (isinstance(substeps, int) and substeps >= 1)):
            raise UserError(
                f"prior {prior!r}: substeps must be 'auto' or an integer >= 1; got {substeps!r}"
            )
        self.method, self.substeps, self.rho = INTEGRATORS[integrator], substeps, rho

    def substeps_for(self, dt: float) -> int:
        """Return the substep count used for a step of `dt`."""
        if self.substeps != "auto":
            return int(self.substeps)
        return max(1, math.ceil(abs(dt) * self.rho / STEP_RATE - 1e-9))

    def __call__(self, f, y: Tensor, dt: float, t0: Tensor) -> Tensor:
        return self.method(f, y, dt, self.substeps_for(dt), t0=t0)


def std_from(extra: Tensor, scale: Tensor) -> Tensor | None:
    """Return the predicted std ``(B, S)`` from raw outputs ``(B, S)``; None when absent."""
    if extra.shape[-1] == 0:
        return None
    std = F.softplus(extra + STD_SHIFT) * scale.to(extra)  # (B, S) in state units
    return std.clamp_min(STD_FLOOR)


def check_field(system: System, prior: str, params: BoundedParams, what: str) -> None:
    """Raise if the (possibly reduced) vector field is not finite at reference states."""
    ref = reference(system)
    p = params.centre_values().expand(len(ref.t), -1)  # (N, P)
    if not torch.isfinite(system.f(ref.t, ref.y, p)).all():
        raise UserError(
            f"prior {prior!r}: the vector field of {system.name!r} is not finite with {what} "
            f"(division by a zero parameter?); hold such a parameter with fixed={{name: value}}"
        )
