"""The dysts catalogue as systems: names, paths, cross-checks against dysts itself, bad input.

Tests that need dysts skip with the install command when it is missing; the error paths for a
missing extra run either way.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from warp_phys.cli import main
from warp_phys.errors import UserError
from warp_phys.system import SYSTEMS, get_system, is_system_name

needs_dysts = pytest.mark.skipif(
    importlib.util.find_spec("dysts") is None,
    reason="dysts is not installed: pip install -e '.[dysts]'",
)

# Flows cross-checked against dysts: the two classics, a forced flow whose phase is a state
# and whose rhs calls np.cos (traced through the numpy stand-in), a flow with its own numpy
# rhs over arrays (Lorenz96), and one nonlinear in its parameters (the ode prior's case).
SAMPLE = ("Lorenz", "Rossler", "Duffing", "Lorenz96", "LorenzBounded")
# The stores of the cross-check are generated at this tolerance, so that the comparison
# measures the vector field, not the integrator: at the default 1e-8 a state of Rossler that
# stays near 0 for a whole period can differ by ~2e-5 of its range (at 1e-10: ~2e-8).
STORE_TOL = 1e-10
REF_TOL = 1e-12  # scipy DOP853 reference
CROSS_RTOL = 1e-6  # largest error over one period / each state's largest |y| over it


def run(capsys, argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def no_dysts(monkeypatch):
    """Make `import dysts` fail, as without the extra (the adapter's caches are cleared)."""
    from warp_phys import dysts_flow
    from warp_phys.dysts import flow_class

    def clear():
        for fn in (dysts_flow._dysts, dysts_flow.flow, flow_class):
            fn.cache_clear()

    clear()
    monkeypatch.setitem(sys.modules, "dysts", None)
    monkeypatch.setitem(sys.modules, "dysts.flows", None)
    yield
    clear()


# -- bad input ---------------------------------------------------------------------------------
def test_asking_for_dysts_without_the_extra_names_the_install_command(no_dysts, tmp_path, capsys):
    with pytest.raises(UserError, match=r"pip install -e '\.\[dysts\]'"):
        get_system("dysts:Lorenz")
    rc, _, err = run(capsys, ["generate", "dysts:Lorenz", "--out", tmp_path / "x.zarr"])
    one_line_error(rc, err, "pip install -e '.[dysts]'")
    rc, _, err = run(capsys, ["systems", "--dysts"])
    one_line_error(rc, err, "pip install -e '.[dysts]'")


def test_plain_names_are_unchanged_and_an_unknown_one_mentions_the_catalogue():
    assert get_system("msd").name == "msd"
    with pytest.raises(UserError, match="unknown system 'nope'.*lorenz63.*dysts:NAME"):
        get_system("nope")
    assert is_system_name("dysts:Anything") and is_system_name("msd")
    assert not is_system_name("nope") and not is_system_name("other:Lorenz")


@needs_dysts
def test_an_unknown_flow_lists_close_matches(tmp_path, capsys):
    with pytest.raises(
        UserError, match="unknown dysts flow 'lorenzz'; close matches: dysts:Lorenz"
    ):
        get_system("dysts:lorenzz")
    rc, _, err = run(capsys, ["generate", "dysts:Rosler", "--out", tmp_path / "x.zarr"])
    one_line_error(rc, err, "unknown dysts flow 'Rosler'", "dysts:Rossler")


@needs_dysts
def test_a_delay_flow_is_refused_with_the_reason(tmp_path, capsys):
    with pytest.raises(UserError, match="delay differential equation"):
        get_system("dysts:MackeyGlass")
    rc, _, err = run(capsys, ["compare", "dysts:MackeyGlass", "--set", f"out_dir={tmp_path}"])
    one_line_error(rc, err, "'MackeyGlass' is a delay differential equation", "t - tau")


# -- the two paths -----------------------------------------------------------------------------
@needs_dysts
def test_a_traced_flow_is_symbolic_with_exact_jacobian_latex_and_defaults():
    from warp_phys import SymbolicSystem
    from warp_phys.dysts import DEFAULTS, flow

    system = get_system("dysts:Lorenz")
    meta = flow("Lorenz").meta
    assert isinstance(system, SymbolicSystem) and system.state == ("x", "y", "z")
    assert system.latex()[0] == r"\dot{x} = - \sigma x + \sigma y"
    rho = meta["parameters"]["rho"]
    assert system.params["rho"].train == pytest.approx((0.95 * rho, 1.05 * rho))
    assert system.params["rho"].test == pytest.approx((0.9 * rho, 1.1 * rho))
    assert system.lyapunov_time == pytest.approx(1 / meta["maximum_lyapunov_estimated"])
    assert system.n_steps == DEFAULTS.periods * DEFAULTS.points_per_period + 1
    span = system.t_span[1] - system.t_span[0]
    assert span == pytest.approx(DEFAULTS.periods * meta["period"], rel=0.01)
    assert np.allclose(system.y0.values, meta["initial_conditions"])
    y = torch.randn(5, 3, dtype=torch.float64) * 10
    p = system.view(system.default_params().expand(5, -1))
    t = torch.zeros(5, dtype=torch.float64)
    from warp_phys.system import System

    assert torch.allclose(system.jacobian(t, y, p), System.jacobian(system, t, y, p))


@needs_dysts
def test_a_field_of_time_alone_takes_a_float_time():
    """Torus's field is a function of t only; a fixed-step stepper (ode_fit) passes t as a float."""
    system = get_system("dysts:Torus")
    p = system.default_params().expand(2, -1)
    y = torch.zeros(2, 3, dtype=torch.float64)
    want = system.f(torch.full((2,), 0.5, dtype=torch.float64), y, p)
    torch.testing.assert_close(system.f(0.5, y, p), want, rtol=0, atol=0)
    assert system.jacobian(0.5, y, system.view(p)).shape == (2, 3, 3)


@needs_dysts
def test_range_overrides_apply_to_a_flow():
    system = get_system("dysts:Lorenz", train_ranges={"rho": (20.0, 21.0)})
    assert system.params["rho"].train == (20.0, 21.0)
    with pytest.raises(UserError, match="unknown parameter 'nope'.*beta, rho, sigma"):
        get_system("dysts:Lorenz", train_ranges={"nope": (1.0, 2.0)})


@needs_dysts
def test_the_catalogue_says_which_path_and_prior_apply():
    from warp_phys.dysts import entry
    from warp_phys.identify import linear_form

    assert (entry("Lorenz").path, entry("Lorenz").prior) == ("symbolic", "lsq")
    assert (entry("LorenzBounded").path, entry("LorenzBounded").prior) == ("symbolic", "ode")
    assert (entry("MacArthur").path, entry("MacArthur").prior) == ("callback", "none")
    assert entry("SprottA").prior == "none" and "no nonzero parameter" in entry("SprottA").why
    assert entry("MackeyGlass").path == "delay"
    # the symbolic check agrees with the one default_models uses
    assert linear_form(get_system("dysts:Lorenz")) is not None
    assert linear_form(get_system("dysts:LorenzBounded")) is None


@needs_dysts
def test_systems_dysts_lists_flows_and_coverage(monkeypatch, capsys):
    from warp_phys import dysts as adapter

    monkeypatch.setattr(adapter, "flow_names", lambda: ["Lorenz", "MacArthur", "MackeyGlass"])
    rc, out, _ = run(capsys, ["systems", "--dysts"])
    assert rc == 0
    assert "dysts:Lorenz" in out and "symbolic prior lsq" in out and "rho=28" in out
    assert "callback prior none" in out and "delay" in out
    assert "coverage: flows 3, delay (refused) 1, symbolic 1, numpy callback 1" in out


@needs_dysts
def test_a_callback_flow_evaluates_dysts_rhs_row_by_row():
    """MacArthur (array parameters, np.min): the callback matches dysts' own rhs, per row."""
    import dysts.flows

    from warp_phys.dysts_flow import evaluate, flow

    f = flow("MacArthur")
    rng = np.random.default_rng(0)
    y = np.abs(np.asarray(f.meta["initial_conditions"])) * (1 + 0.1 * rng.random((3, f.dim)))
    p = np.array(list(f.params.values()))
    got = evaluate(f, np.zeros(3), y, np.repeat(p[None], 3, 0))
    want = np.array([dysts.flows.MacArthur().rhs(row, 0.0) for row in y])
    assert np.array_equal(got, want)


@needs_dysts
def test_physics_priors_and_ode_fit_refuse_a_callback_flow(tmp_path, capsys):
    """Lorenz forced through the numpy callback: same data path, priors refuse it (exit 2)."""
    from warp_phys.compare import default_models
    from warp_phys.dysts import flow_class
    from warp_phys.identify import ode_fit
    from warp_phys.root import build_root
    from warp_phys.system import register_system

    cls = flow_class("Lorenz", symbolic=False)
    system = cls()
    for prior in ("ode", "lsq", "hybrid"):
        with pytest.raises(UserError, match=f"prior '{prior}' does not apply.*numpy"):
            build_root(prior, state_dim=3, system=system)
    with pytest.raises(UserError, match="ode_fit does not apply"):
        ode_fit(system, system.times(), torch.zeros(1, system.n_steps, 3), 100)
    assert "warp_phys" not in default_models(system)
    # same field as the symbolic path (different operation order: a few ulps)
    sym = get_system("dysts:Lorenz")
    y = torch.randn(7, 3, dtype=torch.float64) * 10
    p = sym.view(sym.default_params().expand(7, -1))
    t = torch.zeros(7, dtype=torch.float64)
    torch.testing.assert_close(system.vector_field(t, y, p), sym.vector_field(t, y, p))

    name = "test_dysts_lorenz_callback"
    callback = type(name, (cls,), {"t_span": (0.0, 0.5), "n_steps": 21})  # a short grid: quick
    register_system(name)(callback)
    try:
        store = tmp_path / "cb.zarr"
        small = ["--n-train", "1", "--n-val", "1", "--n-test", "1", "--n-test-ood", "1", "-q"]
        rc, _, err = run(capsys, ["generate", name, "--out", store, *small])
        assert rc == 0, err
        train = ["train", "--data", store, "--model", "warp", "--prior", "ode"]
        train += ["--out", tmp_path / "run"]
        rc, _, err = run(capsys, [*train, "--set", "data.context=5", "-q"])
        one_line_error(rc, err, "prior 'ode' does not apply", "numpy")
    finally:
        SYSTEMS.unregister(name)


# -- cross-checks against dysts ----------------------------------------------------------------
@needs_dysts
@pytest.mark.parametrize("name", SAMPLE)
def test_stored_trajectories_match_dysts_rhs_integrated_by_scipy(name, tmp_path):
    """Our store (test_ood: the widest parameters) against dysts' own right-hand side at the
    trajectory's parameters, integrated by scipy DOP853 at rtol = atol = 1e-12 over one period."""
    import dysts.flows

    from warp_phys.store import generate_store, open_split

    system = get_system(f"dysts:{name}")
    path = tmp_path / "s.zarr"
    generate_store(
        system, path, counts={"test_ood": 1}, seed=3, rtol=STORE_TOL, atol=STORE_TOL, progress=False
    )
    ds = open_split(path, "test_ood").load()
    flat = dict(zip(ds["parameter"].values.tolist(), ds["params"].values[0], strict=True))
    obj = getattr(dysts.flows, name)()
    params = {}
    for key, value in obj.params.items():  # dysts' own parameter names and shapes
        shape = np.shape(value)
        cells = [flat["_".join([key, *map(str, i)]) if shape else key] for i in np.ndindex(shape)]
        params[key] = np.array(cells).reshape(shape) if shape else cells[0]
    assert params.keys() == obj.params.keys()
    flow = getattr(dysts.flows, name)(parameters=params)
    t, y = ds["time"].values, ds["y"].values[0]
    keep = t <= t[0] + flow.period
    sol = solve_ivp(
        lambda tt, yy: np.asarray(flow.rhs(yy, tt), dtype=np.float64),
        (t[0], t[keep][-1]),
        y[0],
        method="DOP853",
        rtol=REF_TOL,
        atol=REF_TOL,
        t_eval=t[keep],
    )
    assert sol.status == 0 and keep.sum() > 10
    scale = np.abs(sol.y.T).max(0)
    err = np.abs(sol.y.T - y[keep]).max(0) / scale
    assert (err < CROSS_RTOL).all(), (name, err)


@needs_dysts
def test_generate_a_flow_with_ranges_and_load_it_back(tmp_path, capsys):
    from warp_phys.data import default_path, load_dataset

    path = tmp_path / "lorenz.zarr"
    small = ["--n-train", "2", "--n-val", "1", "--n-test", "1", "--n-test-ood", "1", "-q"]
    ranges = ["--range", "rho=27,27.5", "--ood-range", "rho=26,29"]
    rc, out, err = run(capsys, ["generate", "dysts:Lorenz", "--out", path, *small, *ranges])
    assert rc == 0, err
    assert "system 'dysts:Lorenz'" in out and "x' = -sigma*x + sigma*y" in out
    data = load_dataset(path)
    assert data.system.name == "dysts:Lorenz" and data.system.lyapunov_time > 0
    assert data.system.params["rho"].train == (27.0, 27.5)
    assert data.system.params["rho"].test == (26.0, 29.0)
    rho = data.splits["train"].params[:, data.parameter.index("rho")]
    assert ((rho >= 27.0) & (rho <= 27.5)).all()
    assert data.splits["test_ood"].y.shape == (1, data.system.n_steps, 3)

    from warp_phys.cli import _run_config

    cfg = _run_config("dysts:Lorenz", type("A", (), {"overrides": []})(), [])
    assert cfg.data.system == "dysts:Lorenz" and cfg.name == "dysts_Lorenz"
    assert ":" not in str(default_path(cfg.data))


def test_the_numpy_stand_in_traces_elementary_functions_and_refuses_branches():
    import sympy

    from warp_phys.trace import SYMPY_BUILTINS, SYMPY_NUMPY, with_numpy

    def rhs(x, a):
        return a * np.sin(x) + max(0, x) + np.pi

    def branchy(x):
        return x if x > 0 else -x

    class Dispatcher:  # what numba's @njit leaves: the Python function as .py_func
        py_func = staticmethod(rhs)

    x, a = sympy.symbols("x a", real=True)
    traced = with_numpy(Dispatcher(), SYMPY_NUMPY, SYMPY_BUILTINS)(x, a)
    assert traced == a * sympy.sin(x) + sympy.Max(0, x) + sympy.pi
    numeric = with_numpy(rhs, SYMPY_NUMPY, SYMPY_BUILTINS)(1.0, 2.0)  # pi stays symbolic
    assert float(numeric) == pytest.approx(rhs(1.0, 2.0), rel=1e-15)
    with pytest.raises(TypeError):
        with_numpy(branchy, SYMPY_NUMPY)(x)
