"""A dysts flow in warp-phys' terms: its parameters as named scalars, its states named, its
right-hand side evaluated on numbers (one state, or a batch with per-row parameters) or traced
on sympy symbols. `dysts.py` turns flows into systems.

    f = flow("Lorenz")              # UserError with close matches for an unknown name
    f.params                        # {"beta": 2.667, "rho": 28.0, "sigma": 10.0}
    trace(f)                        # sympy expressions of the right-hand side
    evaluate(f, t, y, params)       # dysts' own numpy rhs, t (N,), y (N, S), params (N, P)

Array parameters (a coupling matrix ``k``) become scalars ``k_0_0, k_0_1, ...`` (C order).
dysts writes right-hand sides as ``_rhs(x, y, z, t, *params)`` (parameters in sorted order,
numba ``@staticjit`` when numba is installed: its ``py_func`` is what is traced) or as a
method ``rhs(self, X, t)`` reading ``self.<param>``; binding parameters on a copy of the dysts
object serves both.
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import json
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sympy

from warp_phys.errors import UserError
from warp_phys.trace import SYMPY_BUILTINS, SYMPY_NUMPY, with_numpy

PREFIX = "dysts"  # systems are named dysts:NAME
INSTALL = "pip install -e '.[dysts]' (or pip install dysts==0.96)"


# -- the catalogue ------------------------------------------------------------------------------
@functools.cache
def _dysts() -> tuple[types.ModuleType, dict]:
    """Import dysts' flows and read its JSON; UserError naming the install when missing."""
    try:
        with warnings.catch_warnings():  # "Numba not installed": numba is optional here too
            warnings.simplefilter("ignore")
            flows = importlib.import_module("dysts.flows")
    except ImportError as err:
        raise UserError(
            f"the dysts catalogue needs the optional extra: {INSTALL}; importing dysts failed: "
            f"{err}"
        ) from None
    path = Path(flows.__file__).parent / "data" / "chaotic_attractors.json"
    return flows, json.loads(path.read_text())


def flow_names() -> list[str]:
    """Return every flow of dysts' catalogue (delay equations included), sorted."""
    flows, meta = _dysts()
    return sorted(n for n in meta if inspect.isclass(getattr(flows, n, None)))


def _check_name(name: str) -> None:
    names = flow_names()
    if name in names:
        return
    lower = {n.lower(): n for n in names}
    close = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=5)]
    hint = f"close matches: {', '.join(f'{PREFIX}:{n}' for n in close)}" if close else ""
    raise UserError(
        f"unknown dysts flow {name!r}; {hint or 'no close match'} "
        f"(`warp-phys systems --dysts` lists all {len(names)})"
    )


@dataclass(frozen=True)
class Flow:
    """One dysts flow in our terms: parameters flattened to scalars, states named."""

    name: str
    obj: Any  # the dysts flow object at its published parameters
    meta: dict  # its entry of dysts' JSON
    params: dict[str, float]  # flat name -> value (array parameters as name_i, name_i_j)
    shapes: dict[str, tuple[int, ...]]  # dysts parameter -> shape (() for scalars)
    state: tuple[str, ...]

    @property
    def dim(self) -> int:
        return len(self.state)

    @property
    def delay(self) -> bool:
        return bool(self.meta.get("delay"))

    def unflatten(self, values: dict[str, Any]) -> dict[str, Any]:
        """Flat values (numbers, arrays over a batch, symbols) -> dysts' parameter dict."""
        out = {}
        for key, shape in self.shapes.items():
            if not shape:
                out[key] = values[key]
                continue
            cells = [values[_cell(key, i)] for i in np.ndindex(shape)]
            arr = np.empty(len(cells), dtype=object)
            arr[:] = cells
            out[key] = arr.reshape(shape) if _is_symbolic(cells) else _stack(cells, shape)
        return out

    def bound(self, values: dict[str, Any], *, symbolic: bool = False) -> Any:
        """Return a copy of the dysts object with parameters `values` (flat names); with
        `symbolic`, its methods are Python functions that follow sympy (see trace.py)."""
        obj = copy.copy(self.obj)
        params = self.unflatten(values)
        obj.params = params
        obj.__dict__.update(params)
        obj.param_list = [params[k] for k in sorted(params)]
        if symbolic:
            for name, fn in _methods(type(self.obj)).items():
                plain = with_numpy(fn[1], SYMPY_NUMPY, SYMPY_BUILTINS)
                setattr(obj, name, plain if fn[0] else types.MethodType(plain, obj))
        return obj

    def rhs(self, values: dict[str, Any], y: np.ndarray, t: Any, *, symbolic: bool = False):
        """dysts' right-hand side at one state ``y (S,)``: a sequence of S values."""
        return self.bound(values, symbolic=symbolic).rhs(y, t)


def _cell(key: str, index: tuple[int, ...]) -> str:
    return "_".join([key, *map(str, index)])


def _is_symbolic(cells: list) -> bool:
    return any(isinstance(c, sympy.Basic) for c in cells)


def _stack(cells: list, shape: tuple[int, ...]) -> np.ndarray:
    arrs = np.broadcast_arrays(*[np.asarray(c, dtype=np.float64) for c in cells])
    return np.stack(arrs).reshape(*shape, *arrs[0].shape)  # (*shape, *batch)


def _methods(cls: type) -> dict[str, tuple[bool, Any]]:
    """Functions a flow class defines in dysts' module (its own and its bases'): name ->
    (is static, function). Base classes of dysts itself (DynSys.rhs) call these by name."""
    out: dict[str, tuple[bool, Any]] = {}
    for klass in cls.__mro__:
        if klass.__module__ != cls.__module__:
            continue
        for name, attr in vars(klass).items():
            if name.startswith("__") or name in out:
                continue
            if isinstance(attr, staticmethod):
                while isinstance(attr, staticmethod):  # dysts stacks @staticmethod @staticjit
                    attr = attr.__func__
                out[name] = (True, attr)
            elif isinstance(attr, types.FunctionType):
                out[name] = (False, attr)
    return out


@functools.cache
def flow(name: str) -> Flow:
    """Return the flow `name` of dysts' catalogue (UserError with close matches if unknown)."""
    flows, meta = _dysts()
    _check_name(name)
    entry = meta[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = getattr(flows, name)()
    params, shapes = {}, {}
    for key in sorted(entry["parameters"]):
        value = np.asarray(entry["parameters"][key], dtype=np.float64)
        shapes[key] = value.shape
        for index in np.ndindex(value.shape):
            params[_cell(key, index) if value.shape else key] = float(value[index])
    dim = int(entry["embedding_dimension"])
    return Flow(name, obj, entry, params, shapes, _state_names(type(obj), dim, set(params)))


def _state_names(cls: type, dim: int, taken: set[str]) -> tuple[str, ...]:
    """The argument names of the flow's ``_rhs`` before `t` (x, y, z, ...) when it has one,
    else x1..xd; never a parameter name or t."""
    names: list[str] = []
    fn = _methods(cls).get("_rhs")
    if fn is not None:
        args = list(inspect.signature(getattr(fn[1], "py_func", fn[1])).parameters)
        if "t" in args and args.index("t") == dim:
            names = args[:dim]
    if len(set(names)) != dim or set(names) & (taken | {"t"}):
        names = [f"x{i + 1}" for i in range(dim)]
    while set(names) & taken:
        names = [f"{n}_" for n in names]
    return tuple(names)


def trace(f: Flow) -> tuple[sympy.Expr, ...]:
    """Run the flow's right-hand side on sympy symbols; raise when it cannot be followed."""
    t = sympy.Symbol("t", real=True)
    ys = np.empty(f.dim, dtype=object)
    ys[:] = [sympy.Symbol(s, real=True) for s in f.state]
    ps = {n: sympy.Symbol(n, real=True) for n in f.params}
    out = f.rhs(ps, ys, t, symbolic=True)
    exprs = tuple(sympy.sympify(e) for e in np.asarray(out, dtype=object).reshape(-1))
    if len(exprs) != f.dim:
        raise ValueError(f"the right-hand side gave {len(exprs)} values for {f.dim} states")
    return exprs


def sample_points(f: Flow, span: tuple[float, float], n: int, rng: np.random.Generator):
    """Random states near the attractor, parameters ±10% and times: (t (n,), y (n, S), p (n, P))."""
    ic = np.asarray(f.meta["initial_conditions"], dtype=np.float64)
    std = np.asarray(f.meta["std"], dtype=np.float64)
    y = ic + np.where(std > 0, std, 1.0) * rng.standard_normal((n, f.dim))
    p0 = np.array(list(f.params.values()))
    p = p0 * (1 + 0.1 * rng.uniform(-1, 1, (n, p0.size)))
    t = rng.uniform(*span, n)
    return t, y, p


def as_row(out) -> np.ndarray:
    return np.asarray([np.asarray(v, dtype=np.float64) for v in out], dtype=np.float64)


def evaluate(f: Flow, t: np.ndarray, y: np.ndarray, params: np.ndarray) -> np.ndarray:
    """dysts' right-hand side for a batch: ``t (N,)``, ``y (N, S)``, ``params (N, P)`` ->
    ``(N, S)``; one vectorised call when the flow allows it (checked once), else row by row."""
    if _vectorises(f.name):
        return _batched(f, t, y, params)
    # row by row, each distinct row once (the integrator pads its batch with copies)
    out, seen = np.empty_like(y), {}
    for i, row in enumerate(np.column_stack((t, y, params))):
        j = seen.setdefault(row.tobytes(), i)
        out[i] = out[j] if j < i else as_row(_bound(f.name, params[i].tobytes()).rhs(y[i], t[i]))
    return out


@functools.lru_cache(maxsize=4096)
def _bound(name: str, params: bytes) -> Any:
    """The dysts object of flow `name` at one parameter vector (float64 bytes): binding costs
    ~10x a call of a small right-hand side, and a trajectory keeps its parameters."""
    f = flow(name)
    return f.bound(dict(zip(f.params, np.frombuffer(params), strict=True)))


def _batched(f: Flow, t: np.ndarray, y: np.ndarray, params: np.ndarray) -> np.ndarray:
    obj = f.bound(dict(zip(f.params, params.T, strict=True)))
    # DynSys.rhs unpacks X.T into the states; a flow's own rhs unpacks X itself
    out = obj.rhs(y.T, t) if "rhs" in _methods(type(f.obj)) else obj.rhs(y, t)
    cols = np.broadcast_arrays(*[np.asarray(v, dtype=np.float64) for v in out], t)[:-1]
    return np.stack(cols, -1)  # (N, S)


@functools.cache
def _vectorises(name: str) -> bool:
    f = flow(name)
    t, y, p = sample_points(f, (0.0, 1.0), 5, np.random.default_rng(1))
    rows = np.array(
        [as_row(f.rhs(dict(zip(f.params, p[i], strict=True)), y[i], t[i])) for i in range(5)]
    )
    try:
        with np.errstate(all="ignore"):
            batch = _batched(f, t, y, p)
    except Exception:  # noqa: BLE001 - dysts code written for one state: go row by row
        return False
    return batch.shape == rows.shape and np.allclose(
        batch, rows, rtol=1e-13, atol=0, equal_nan=True
    )
