"""The dysts catalogue as systems: ``dysts:NAME`` wherever a system name is accepted.

    system = get_system("dysts:Lorenz")        # a SymbolicSystem: torch field, Jacobian, LaTeX
    warp-phys generate dysts:Rossler --out rossler.zarr
    warp-phys systems --dysts                  # every flow, its path and whether priors apply

dysts (W. Gilpin, "Chaos as an interpretable benchmark for forecasting and data-driven
modelling", NeurIPS Datasets and Benchmarks 2021; ``pip install -e '.[dysts]'``) publishes
~130 chaotic flows, each with parameters, an initial condition on its attractor, the
attractor's mean and standard deviation per state, a dominant period, an integration step
`dt` and an estimated largest Lyapunov exponent. Nothing here names a flow: every one goes
through the same steps.

- **Symbolic path.** The flow's right-hand side (its ``rhs``/``_rhs`` and helpers, numba's
  ``py_func`` when numba is installed) is run on sympy symbols (`trace.py`); the expressions
  become a `SymbolicSystem`, accepted only if its torch field matches dysts' own right-hand
  side at random states and parameters (`VERIFY_RTOL`). The physics priors and ``ode_fit``
  then apply: ``lsq`` when the field is linear in its parameters, else ``ode``.
- **Callback path.** A flow sympy cannot follow (a branch on the state, ``np.min``) is
  integrated by calling dysts' numpy right-hand side; physics priors and ``ode_fit`` refuse it
  with the reason (they need a torch field).
- **Delay equations** are refused with the reason: they are not ODEs.

Defaults (`DEFAULTS`, the one place they are declared; ``--range``/``--ood-range`` override
the parameter ranges) are described on `CatalogueDefaults`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from warp_phys.callback import NumpySystem
from warp_phys.dysts_flow import (
    PREFIX,
    Flow,
    as_row,
    evaluate,
    flow,
    flow_names,
    sample_points,
    trace,
)
from warp_phys.errors import UserError
from warp_phys.symbolic import SymbolicSystem
from warp_phys.system import Box, Param, System

VERIFY_POINTS = 64  # random (state, parameter) points at which a trace is checked
# traced torch field vs dysts' numpy rhs, relative to the largest |f_i| over the points:
# float64 arithmetic in a different order differs by a few ulps times the size of the
# intermediate terms, which cancellation can make ~1e3 x the result
VERIFY_RTOL = 1e-9


@dataclass(frozen=True)
class CatalogueDefaults:
    """How a dysts flow becomes a dataset; one instance, `DEFAULTS`.

    Attributes:
        train_fraction: train/val/test draw each nonzero parameter uniformly from
            p0 (1 ± train_fraction), p0 the value in dysts' JSON. ±5%: wide enough that the
            parameters must be read from the context, narrow enough that most flows keep the
            attractor dysts' parameters were tuned for (many are near a bifurcation; the sweep
            in benchmarks/dysts_sweep.py counts the flows that leave it).
        ood_fraction: test_ood draws from p0 (1 ± ood_fraction), twice as wide (the paper's MSD
            protocol widens its ranges in the same way). A zero parameter stays fixed.
        y0_fraction: initial states uniform in ic ± y0_fraction · std per state (dysts' `ic`
            lies on the attractor; std is its per-state standard deviation there), for every
            split: close to the attractor, so that no trajectory starts with a long transient.
        periods: the time span, in dysts' dominant periods: a context of 100 steps is 2
            periods, the forecast 6 (1.5 to 25 Lyapunov times for 80% of the flows, median 5.6).
        points_per_period: the saved step is the whole multiple of dysts' `dt` (its
            integration step, ~period/5000) closest to period / points_per_period.
    """

    train_fraction: float = 0.05
    ood_fraction: float = 0.10
    y0_fraction: float = 0.2
    periods: float = 8.0
    points_per_period: int = 50

    def ranges(self, p0: float) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        """Return the (train, test) ranges of a parameter whose dysts value is `p0`."""
        if p0 == 0:
            return None, None
        return _around(p0, self.train_fraction), _around(p0, self.ood_fraction)

    def grid(self, period: float, dt: float) -> tuple[tuple[float, float], int]:
        """Return (t_span, n_steps) for a flow of dominant `period` and integration step `dt`."""
        every = max(1, round(period / (self.points_per_period * dt)))
        h = every * dt
        n = max(2, round(self.periods * period / h))
        return (0.0, n * h), n + 1


DEFAULTS = CatalogueDefaults()


def _around(p0: float, fraction: float) -> tuple[float, float]:
    lo, hi = p0 * (1 - fraction), p0 * (1 + fraction)
    return (min(lo, hi), max(lo, hi))


def refuse_delay(f: Flow) -> None:
    """Raise UserError, with the reason, for a delay differential equation."""
    if f.delay:
        raise UserError(
            f"dysts flow {f.name!r} is a delay differential equation (its right-hand side reads "
            f"the state at t - tau, tau = {f.meta['parameters'].get('tau', '?')}): warp-phys "
            f"integrates ordinary differential equations only; pick another flow"
        )


def verify(system: System, f: Flow, *, seed: int = 0) -> str:
    """Return "" when `system`'s torch field (and, when symbolic, its exact Jacobian) agree with
    dysts' right-hand side at `VERIFY_POINTS` random points, else what disagrees."""
    t, y, p = sample_points(f, system.t_span, VERIFY_POINTS, np.random.default_rng(seed))
    theirs = np.array(
        [as_row(f.rhs(dict(zip(f.params, p[i], strict=True)), y[i], t[i])) for i in range(len(y))]
    )
    tt, yy, pp = (torch.as_tensor(a) for a in (t, y, p))
    ours = system.vector_field(tt, yy, system.view(pp)).numpy()
    why = _compare("field", ours, theirs)
    if why or not isinstance(system, SymbolicSystem):
        return why
    # the exact Jacobian against autograd of the same field (this checks the derivatives of
    # Heaviside, sign, Max: they map to torch by name), where both are defined: at a kink
    # (sqrt(max(0, x)) at x <= 0) one may be NaN and the other not, and neither is wrong
    exact = system.jacobian(tt, yy, system.view(pp)).numpy()
    auto = System.jacobian(system, tt, yy, system.view(pp)).numpy()
    both = np.isfinite(exact) & np.isfinite(auto)
    defined = np.isfinite(theirs).all(-1)[:, None, None]
    if both.sum() < 0.5 * np.broadcast_to(defined, both.shape).sum():
        return "the traced Jacobian is not finite at most points where the field is"
    return _compare("Jacobian", np.where(both, exact, 0), np.where(both, auto, 0), "autograd's")


def _compare(what: str, ours: np.ndarray, theirs: np.ndarray, other: str = "dysts'") -> str:
    finite = np.isfinite(theirs)
    if not np.array_equal(finite, np.isfinite(ours)):
        return f"the traced {what} is finite where {other} is not, or the reverse"
    scale = np.where(finite, np.abs(theirs), 0).max(0, keepdims=True) + 1e-300
    err = float(np.where(finite, np.abs(ours - theirs) / scale, 0).max())
    if err > VERIFY_RTOL:
        return f"the traced {what} differs from {other} by {err:.1e} (relative)"
    return ""


class DystsCallback(NumpySystem):
    """A dysts flow integrated through dysts' own numpy right-hand side (data only)."""

    flow_name: str = ""

    @property
    def equations(self) -> tuple[str, ...]:  # type: ignore[override]
        return (f"dysts.flows.{self.flow_name}.rhs (numpy callback; {self.untraced})",)

    def numpy_field(self, t: np.ndarray, y: np.ndarray, params: np.ndarray) -> np.ndarray:
        return evaluate(flow(self.flow_name), t, y, params)


# -- flows as systems ---------------------------------------------------------------------
def _attrs(f: Flow) -> dict:
    meta = f.meta
    t_span, n_steps = DEFAULTS.grid(float(meta["period"]), float(meta["dt"]))
    ic = np.asarray(meta["initial_conditions"], dtype=np.float64)
    std = np.asarray(meta["std"], dtype=np.float64)
    half = DEFAULTS.y0_fraction * np.where(std > 0, std, np.maximum(np.abs(ic), 1.0))
    lyap = float(meta.get("maximum_lyapunov_estimated") or 0.0)
    params = {}
    for n, v in f.params.items():
        train, test = DEFAULTS.ranges(v)
        params[n] = Param(v, train=train, test=test)
    return {
        "__doc__": f"dysts {f.name}: {meta.get('description', '')}",
        "__module__": __name__,
        "flow_name": f.name,
        "state": f.state,
        "params": params,
        "y0": Box(low=tuple(ic - half), high=tuple(ic + half)),
        "t_span": t_span,
        "n_steps": n_steps,
        "citation": meta.get("citation", ""),
        "lyapunov_time": 1.0 / lyap if lyap > 0 else None,
    }


@functools.cache
def flow_class(name: str, *, symbolic: bool = True) -> type[System]:
    """Return the system class of the dysts flow `name` (what ``get_system("dysts:NAME")``
    instantiates): symbolic when its right-hand side traces and verifies, else a callback
    (always, with ``symbolic=False``: e.g. to check one path against the other)."""
    f = flow(name)
    refuse_delay(f)
    attrs = _attrs(f)
    why = "" if symbolic else "symbolic=False"
    try:
        exprs = trace(f) if symbolic else ()
    except Exception as err:  # noqa: BLE001 - dysts code sympy cannot follow
        why = _one_line(err)
    if not why:
        cls = type(f"dysts_{name}", (SymbolicSystem,), {**attrs, "rhs": exprs})
        cls.name = f"{PREFIX}:{name}"
        try:
            with np.errstate(all="ignore"):
                why = verify(cls(), f)
        except Exception as err:  # noqa: BLE001 - e.g. a function torch does not have
            why = _one_line(err)
        if not why:
            return cls
    untraced = f"dysts' rhs not traced into sympy: {why}"
    cls = type(f"dysts_{name}", (DystsCallback,), {**attrs, "untraced": untraced})
    cls.name = f"{PREFIX}:{name}"
    return cls


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:120]}"


# -- what applies to each flow ------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One line of `catalogue()`."""

    name: str  # dysts:NAME
    dim: int
    params: dict[str, float]
    path: str  # "symbolic", "callback" or "delay" (refused)
    prior: str  # "lsq" (linear in its unknowns), "ode" or "none"
    why: str  # why the path is not symbolic, or why no prior applies ("" otherwise)


def entry(name: str) -> Entry:
    """Say how the flow `name` enters warp-phys and which physics prior applies to it."""
    f = flow(name)
    head = {"name": f"{PREFIX}:{name}", "dim": f.dim, "params": dict(f.params)}
    if f.delay:
        return Entry(**head, path="delay", prior="none", why="delay equation (not an ODE)")
    cls = flow_class(name)
    if issubclass(cls, DystsCallback):
        return Entry(**head, path="callback", prior="none", why=cls.untraced)
    unknown = [n for n, p in cls.params.items() if p.train is not None]
    if not unknown:
        return Entry(**head, path="symbolic", prior="none", why="no nonzero parameter to learn")
    prior = "lsq" if linear_in(cls(), f, unknown) else "ode"
    return Entry(**head, path="symbolic", prior=prior, why="")


def catalogue() -> list[Entry]:
    """Return an `Entry` for every flow of dysts' catalogue."""
    return [entry(n) for n in flow_names()]


def linear_in(system: System, f: Flow, names: list[str], *, seed: int = 0) -> bool:
    """Whether the field is affine in the parameters `names` (the lsq prior's condition):
    f(p + a + b) - f(p + a) - f(p + b) + f(p) = 0 at random states, parameters and steps
    a, b along `names`; within `LINEARITY_RTOL` of the size of the terms, as
    `identify.linear_form` decides it."""
    from warp_phys.identify import LINEARITY_RTOL

    rng = np.random.default_rng(seed)
    t, y, p = (torch.as_tensor(a) for a in sample_points(f, system.t_span, VERIFY_POINTS, rng))
    mask = torch.tensor([n in names for n in f.params], dtype=torch.float64)
    a, b = (p * mask * torch.as_tensor(rng.uniform(-0.1, 0.1, p.shape)) for _ in range(2))
    with torch.no_grad():
        terms = [system.f(t, y, q) for q in (p + a + b, p + a, p + b, p)]
    second = terms[0] - terms[1] - terms[2] + terms[3]
    size = sum(x.abs() for x in terms)
    ok = torch.isfinite(size)
    return bool((second.abs()[ok] <= LINEARITY_RTOL * size[ok] + 1e-300).all())


def describe_catalogue(entries: list[Entry]) -> dict[str, int]:
    """Coverage counts: flows, generated (not delay), symbolic, with a prior, with lsq."""
    return {
        "flows": len(entries),
        "delay (refused)": sum(e.path == "delay" for e in entries),
        "symbolic": sum(e.path == "symbolic" for e in entries),
        "numpy callback": sum(e.path == "callback" for e in entries),
        "with a physics prior": sum(e.prior != "none" for e in entries),
        "lsq prior": sum(e.prior == "lsq" for e in entries),
        "ode prior": sum(e.prior == "ode" for e in entries),
    }
