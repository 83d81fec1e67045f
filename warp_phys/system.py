"""Dynamical systems: the declaration a user writes once, in one file of `systems/`.

A system declares its state names, its parameters with sampling ranges for training and for
an out-of-distribution test set, an initial-state distribution, a time grid and a batched
vector field ``f(t, y, p)``:

    @register_system("msd")
    class MassSpringDamper(System):
        state = ("x", "v")
        params = {"m": Param(0.03, train=(0.02, 0.04), test=(0.01, 0.05)), ...}
        y0 = Fixed(1.0, 0.0)
        def vector_field(self, t, y, p):
            x, v = y.unbind(-1)
            return torch.stack((v, -(p.k * x + p.c * v) / p.m), dim=-1)

`y` is ``(..., state)`` and each ``p.name`` a tensor broadcastable to ``y[..., 0]``, so one
call advances trajectories with different parameters. `t` is a scalar tensor or, from the
built-in integrator (each trajectory keeps its own clock), a ``(...)`` tensor that broadcasts
like a parameter. `SymbolicSystem` (symbolic.py) derives
the vector field, its Jacobian and LaTeX from sympy expressions instead.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from warp_phys.errors import UserError
from warp_phys.registry import Registry

SPLITS = ("train", "val", "test", "test_ood")  # test_ood samples from the wider `test` ranges


@dataclass(frozen=True)
class Param:
    """A physical parameter: default value and uniform sampling ranges.

    Args:
        default: value used when the parameter is not sampled (and the prior's centre).
        train: (low, high) for the train/val/test splits; None keeps it fixed at `default`.
        test: (low, high) for the out-of-distribution split; None reuses `train`.
        unit: free text for reports.
        positive: the parameter is > 0 (priors learn it in log space); inferred from the
            ranges when None.
    """

    default: float
    train: tuple[float, float] | None = None
    test: tuple[float, float] | None = None
    unit: str = ""
    positive: bool | None = None

    def range(self, split: str) -> tuple[float, float]:
        """Return the (low, high) sampling range for `split` (low == high when fixed)."""
        rng = (self.test or self.train) if split == "test_ood" else self.train
        return rng if rng is not None else (self.default, self.default)

    @property
    def is_positive(self) -> bool:
        if self.positive is not None:
            return self.positive
        lows = [r[0] for r in (self.train, self.test) if r is not None]
        return min(lows + [self.default]) > 0


@dataclass(frozen=True)
class Fixed:
    """A fixed initial state, the same for every trajectory."""

    values: tuple[float, ...]

    def __init__(self, *values: float) -> None:
        object.__setattr__(self, "values", tuple(float(v) for v in values))

    draws_per_row = 0  # random numbers one sampled state consumes

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.broadcast_to(
            np.asarray(self.values, dtype=np.float64), (n, len(self.values))
        ).copy()

    def describe(self) -> str:
        return f"fixed {list(self.values)}"


@dataclass(frozen=True)
class Box:
    """Initial states drawn uniformly from the box [low, high] (per state)."""

    low: tuple[float, ...]
    high: tuple[float, ...]

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        low, high = np.asarray(self.low, np.float64), np.asarray(self.high, np.float64)
        return low + (high - low) * rng.random((n, low.size))  # (n, state)

    @property
    def draws_per_row(self) -> int:  # random numbers one sampled state consumes
        return len(self.low)

    @property
    def values(self) -> tuple[float, ...]:
        return tuple((lo + hi) / 2 for lo, hi in zip(self.low, self.high, strict=True))

    def describe(self) -> str:
        return f"uniform box low={list(self.low)} high={list(self.high)}"


@dataclass
class ParamView:
    """Attribute access to a ``(..., n_params)`` tensor: ``p.k`` is ``(...)``."""

    names: tuple[str, ...]
    values: Tensor  # (..., n_params)
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {n: i for i, n in enumerate(self.names)}

    def __getattr__(self, name: str) -> Tensor:
        index = self.__dict__.get("_index", {})
        if name not in index:
            raise AttributeError(f"no parameter {name!r}; parameters are {list(self.names)}")
        return self.values[..., index[name]]


class System(ABC):
    """Base class of every dynamical system. Subclass it once per system; do not subclass further.

    Class attributes to declare: `state`, `params`, `y0`, `t_span`, `n_steps`; optional
    `units`, `y0_test`, `equations` (human-readable lines), `citation`, `identifiable`,
    `lyapunov_time` (chaotic systems: forecasts are then also judged by valid prediction time),
    `state_bounds` (the domain of the states, e.g. populations >= 0: physics forecasts start
    from and stay in it, so a noisy observation below zero cannot send them off to infinity).
    """

    name: str = ""  # set by @register_system
    state: tuple[str, ...] = ()
    units: Mapping[str, str] = {}
    params: Mapping[str, Param] = {}
    y0: Fixed | Box
    y0_test: Fixed | Box | None = None  # initial states of test_ood; None reuses y0
    t_span: tuple[float, float] = (0.0, 1.0)
    n_steps: int = 256
    equations: tuple[str, ...] = ()
    citation: str = ""
    # combinations of parameters the trajectories determine, reported when priors recover
    # parameters: name -> function of a ParamView (e.g. {"k/m": lambda p: p.k / p.m})
    identifiable: Mapping[str, Callable[[ParamView], Tensor]] = {}
    # 1 / (largest Lyapunov exponent) at the default parameters, in the units of t; None when
    # the system is not chaotic
    lyapunov_time: float | None = None
    # state name -> (low, high) of its domain; states not named are unbounded
    state_bounds: Mapping[str, tuple[float, float]] = {}

    def __init__(
        self,
        *,
        train_ranges: Mapping[str, tuple[float, float]] | None = None,
        test_ranges: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        declared = dict(self.params)
        params = dict(declared)
        for which, overrides in (("train", train_ranges), ("test", test_ranges)):
            for pname, rng in (overrides or {}).items():
                if pname not in params:
                    raise UserError(
                        f"unknown parameter {pname!r} for system {self.name!r}; "
                        f"its parameters are {', '.join(params)}"
                    )
                lo, hi = _check_range(pname, rng)
                if declared[pname].is_positive and lo <= 0:
                    raise UserError(
                        f"range of parameter {pname!r} must stay above 0 (system {self.name!r} "
                        f"declares {pname} > 0); got ({lo:g}, {hi:g}): give a positive range"
                    )
                params[pname] = replace(params[pname], **{which: (lo, hi)})
        for pname, p in params.items():
            for rng in (p.train, p.test):
                if rng is not None:
                    _check_range(pname, rng)
        self.params = params

    @abstractmethod
    def vector_field(self, t: Tensor, y: Tensor, p: ParamView) -> Tensor:
        """Return dy/dt, shape of `y` ``(..., state)``; ``p.name`` broadcasts to ``y[..., 0]``."""

    def check_differentiable(self, user: str) -> None:
        """Raise UserError when `user` (a physics prior, ode_fit) cannot work with this system.

        They need a vector field in torch, to differentiate and to integrate inside a model;
        every System written in torch has one. A system that calls out to other code (a numpy
        callback) overrides this and says why."""
        return None

    def jacobian(self, t: Tensor, y: Tensor, p: ParamView) -> Tensor:
        """Return d f / d y, ``(..., state, state)`` (autograd unless a subclass knows better)."""
        y = y.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self.vector_field(t, y, p)
            if not f.requires_grad:  # the field does not depend on y (e.g. the sine task)
                return torch.zeros(*y.shape, y.shape[-1], dtype=y.dtype, device=y.device)
            rows = [
                torch.autograd.grad(f[..., i].sum(), y, retain_graph=True, materialize_grads=True)[
                    0
                ]
                for i in range(f.shape[-1])
            ]
        return torch.stack(rows, dim=-2)  # (..., state, state)

    # -- derived facts ------------------------------------------------------------------
    @property
    def state_dim(self) -> int:
        return len(self.state)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.params)

    def default_params(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Return the default parameter vector, ``(n_params,)``."""
        return torch.tensor([p.default for p in self.params.values()], dtype=dtype)

    def times(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Return the saved time grid, ``(n_steps,)``."""
        return torch.linspace(self.t_span[0], self.t_span[1], self.n_steps, dtype=dtype)

    def view(self, params: Tensor) -> ParamView:
        """Wrap a ``(..., n_params)`` tensor for attribute access in `vector_field`."""
        return ParamView(self.param_names, params)

    def f(self, t: Tensor, y: Tensor, params: Tensor) -> Tensor:
        """Evaluate the vector field with a raw ``(..., n_params)`` parameter tensor."""
        return self.vector_field(t, y, self.view(params))

    def project(self, y: Tensor) -> Tensor:
        """Clip states ``y (..., state)`` into `state_bounds` (a no-op when none are declared)."""
        if not self.state_bounds:
            return y
        inf = float("inf")
        lo = [self.state_bounds.get(n, (-inf, inf))[0] for n in self.state]
        hi = [self.state_bounds.get(n, (-inf, inf))[1] for n in self.state]
        return torch.clamp(y, y.new_tensor(lo), y.new_tensor(hi))

    def ranges(self, split: str) -> dict[str, tuple[float, float]]:
        return {n: p.range(split) for n, p in self.params.items()}

    def initial_states(self, split: str) -> Fixed | Box:
        return (self.y0_test or self.y0) if split == "test_ood" else self.y0

    def sample(self, rng: np.random.Generator, n: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Draw `n` parameter vectors ``(n, n_params)`` and initial states ``(n, state)``.

        The stream is laid out as n x n_params uniforms for the parameters, then the draws of
        the initial states, row after row: `sample_rows` reads any rows of it alone."""
        lows, highs = np.array(list(self.ranges(split).values()), np.float64).reshape(-1, 2).T
        params = lows + (highs - lows) * rng.random((n, lows.size))  # (n, n_params)
        return params, self.initial_state(self.initial_states(split).sample(rng, n), params)

    def sample_rows(
        self, stream: Callable[[int], np.random.Generator], n: int, split: str, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return rows ``lo:hi`` of ``sample(stream(0), n, split)``, drawing only those rows.

        Memory is O(hi - lo) whatever `n`. `stream(k)` returns a fresh generator of the same
        seed advanced past k float64 draws (one draw per uniform: `Generator.random`), and
        `initial_state` acts row by row, so the rows are bitwise those of the whole draw.
        """
        lows, highs = np.array(list(self.ranges(split).values()), np.float64).reshape(-1, 2).T
        P, box = lows.size, self.initial_states(split)
        params = lows + (highs - lows) * stream(lo * P).random((hi - lo, P))  # (hi-lo, n_params)
        y0 = box.sample(stream(n * P + lo * box.draws_per_row), hi - lo)  # (hi - lo, state)
        return params, self.initial_state(y0, params)

    def initial_state(self, y0: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Map sampled initial states to the ones used; override when y0 depends on params."""
        return y0

    def latex(self) -> list[str]:
        """Return one LaTeX line per state equation (plain text when not symbolic)."""
        return list(self.equations)

    def describe(self) -> dict:
        """Return a JSON-able description (stored as attributes next to the data)."""
        return {
            "system": self.name,
            "state": list(self.state),
            "units": dict(self.units),
            "equations": list(self.equations),
            "citation": self.citation,
            "params_default": {n: p.default for n, p in self.params.items()},
            "ranges_train": {n: list(p.range("train")) for n, p in self.params.items()},
            "ranges_test_ood": {n: list(p.range("test_ood")) for n, p in self.params.items()},
            "y0": self.y0.describe(),
            "y0_test_ood": self.initial_states("test_ood").describe(),
            "t_span": list(self.t_span),
            "n_steps": self.n_steps,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_range(pname: str, rng: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in rng)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise UserError(
            f"range of parameter {pname!r} must be finite with low <= high; got ({lo}, {hi}): "
            f"swap or fix the bounds"
        )
    return lo, hi


# dysts:NAME names a flow of the dysts catalogue (optional extra; warp_phys/dysts.py)
SYSTEMS: Registry[type[System]] = Registry(
    "system", "warp_phys.systems", "systems/", catalogues={"dysts": "warp_phys.dysts:flow_class"}
)


def register_system(name: str):
    """Class decorator: file a `System` subclass in the registry under `name`."""
    return SYSTEMS.register(name)


def get_system(name: str, **kwargs) -> System:
    """Return an instance of the registered system `name` (kwargs: range overrides)."""
    return SYSTEMS.get(name)(**kwargs)


def system_names() -> list[str]:
    """Return the registered system names (catalogue names such as dysts:NAME are not listed)."""
    return SYSTEMS.names()


def is_system_name(name: str) -> bool:
    """Whether `name` is a registered system or a catalogue name such as ``dysts:Lorenz``."""
    return SYSTEMS.is_name(name)
