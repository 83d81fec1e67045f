"""In-context system identification (`warp_phys.identify`) and the valid prediction time.

Parametrised over the system registry: a new system is checked with no test edits.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch

from warp_phys import Box, Fixed, Param, System
from warp_phys.errors import UserError
from warp_phys.evaluate import VPT_THRESHOLD, valid_prediction_time
from warp_phys.identify import RULES, linear_form, ode_fit, window_terms
from warp_phys.simulate import simulate
from warp_phys.system import get_system, system_names

pytestmark = pytest.mark.numerics  # also run under ATEN_CPU_CAPABILITY=default (.ci/run)

SYSTEMS = system_names()
N_TRAJ = 8
# Clean data sampled densely: Simpson's rule leaves a relative error O((h·rate)^4) in the
# coefficients; median measured <= 2e-4 (Lotka-Volterra spikes, h·rate ~ 1), 1e-6 elsewhere.
# Single Lotka-Volterra trajectories with a small prey growth rate reach 4e-2 (an
# ill-conditioned fit): the median is what is promised.
COEFF_TOL = 2e-3
FORECAST_TOL = 1e-3  # forecast error over 32 steps, relative to the states' size (measured 5e-5)


@cache
def _data(name: str, split: str = "test_ood"):
    system = get_system(name)
    params, y0 = system.sample(np.random.default_rng(1), N_TRAJ, split)
    ts = system.times()
    ys = simulate(system, torch.as_tensor(y0), torch.as_tensor(params), ts)  # float64
    return system, torch.as_tensor(params), ts, ys


def _context(system) -> int:
    return max(8, system.n_steps // 2)


@pytest.mark.parametrize("name", SYSTEMS)
def test_every_registered_system_is_linear_in_its_unknowns_or_fitted_otherwise(name):
    system = get_system(name)
    form = linear_form(system)
    if form is None:  # e.g. the sine task: phase enters through cos(2πt + phase)
        return
    _, params, ts, ys = _data(name)
    c = form.coefficients(params)  # (N, K)
    t = ts.expand(N_TRAJ, -1)
    F, g = form.features(t, ys)  # (N, T, S, K), (N, T, S)
    f = system.f(t, ys, params[:, None, :])
    field = (F @ c[:, None, :, None]).squeeze(-1) + g
    assert (field - f).abs().max() <= 1e-8 * (f.abs().max() + 1)  # float64 identity


@pytest.mark.parametrize("name", SYSTEMS)
def test_ode_fit_recovers_the_unknowns_and_forecasts_clean_data(name):
    system, params, ts, ys = _data(name)
    L = _context(system)
    H = min(32, system.n_steps - L)
    fit = ode_fit(system, ts, ys[:, : L + H].float(), L)
    form = linear_form(system)
    if form is not None:
        true = form.coefficients(params)
        for k, n in enumerate(form.names):
            rel = (fit.estimates[n].double() - true[:, k]).abs() / true[:, k].abs().clamp_min(1e-12)
            assert rel.median() < COEFF_TOL and rel.isfinite().all(), (n, rel)
    else:
        for n, est in fit.estimates.items():
            j = system.param_names.index(n)
            assert (est.double() - params[:, j]).abs().max() < COEFF_TOL * (
                1 + params[:, j].abs().max()
            )
    size = ys[:, L : L + H].abs().max()
    err = (fit.forecast.double() - ys[:, L : L + H]).abs().amax((1, 2))  # (N,)
    assert err.median() < FORECAST_TOL * size
    assert fit.forecast.shape == (N_TRAJ, H, system.state_dim)


def test_msd_is_fitted_in_its_identifiable_ratios():
    form = linear_form(get_system("msd"))
    assert form.kind == "identifiable" and form.names == ("k/m", "c/m")


def test_simpson_is_exact_for_a_cubic_and_the_trapezoid_is_not():
    class Cubic(System):
        state = ("x",)
        params = {"a": Param(1.0, train=(0.5, 1.5))}
        y0 = Fixed(0.0)
        t_span = (0.0, 1.0)
        n_steps = 5

        def vector_field(self, t, y, p):
            return (p.a * 3 * t**2).unsqueeze(-1) * torch.ones_like(y)  # x = a t^3

    system = Cubic()
    form = linear_form(system)
    t = torch.linspace(0, 1, 5, dtype=torch.float64)
    y = (0.7 * t**3).reshape(1, 5, 1)
    for rule, exact in (("simpson", True), ("trapezoid", False)):
        Phi, r = window_terms(form, t, y, rule)
        z = torch.linalg.lstsq(Phi.reshape(-1, 1), r.reshape(-1, 1)).solution
        a = form.centre + form.half * z.squeeze()
        assert (abs(float(a) - 0.7) < 1e-12) == exact, (rule, float(a))
    assert set(RULES) >= {"trapezoid", "simpson"}


def test_ode_fit_refuses_a_context_too_short_for_its_unknowns():
    system, _, ts, ys = _data("lorenz63")
    with pytest.raises(UserError, match="needs at least 5 context steps to fit the unknowns"):
        ode_fit(system, ts, ys.float(), 3)


def test_a_system_with_nothing_unknown_cannot_be_fitted():
    class Known(System):
        state = ("x",)
        params = {"k": Param(1.0)}  # no train range: nothing to fit
        y0 = Box(low=(0.5,), high=(1.0,))
        n_steps = 8

        def vector_field(self, t, y, p):
            return -p.k.unsqueeze(-1) * y

    with pytest.raises(UserError, match="no unknown parameters"):
        linear_form(Known())


def test_forecasts_stay_in_the_declared_state_domain():
    system, _, ts, ys = _data("lotka_volterra")
    L = 100
    noisy = ys.clone()
    noisy[:, L - 1] = -0.05  # an observation below zero: a population cannot be negative
    fit = ode_fit(system, ts, noisy.float(), L)
    assert (fit.forecast >= 0).all() and torch.isfinite(fit.forecast).all()


def test_valid_prediction_time_is_the_first_smape_crossing_in_lyapunov_times():
    truth = torch.ones(2, 10, 2)
    pred = truth.clone()
    # sMAPE per step: 200/S Σ |p - y| / (|p| + |y|); state 0 off by 2 -> 200/2 · 2/4 = 50 > 30
    pred[0, 4:, 0] = 3.0
    got = valid_prediction_time(pred, truth, dt=0.5, lyapunov_time=2.0)
    assert got.tolist() == [4 * 0.5 / 2.0, 10 * 0.5 / 2.0]  # never crossing: the whole horizon
    pred[1, 7, 1] = float("nan")  # a blown-up forecast fails there
    assert valid_prediction_time(pred, truth, 0.5, 2.0)[1].item() == 7 * 0.5 / 2.0
    assert VPT_THRESHOLD == 30.0


def test_a_context_too_short_for_the_fit_is_one_line_before_any_training(msd_store, capsys):
    from warp_phys.cli import main

    argv = ["train", "--data", str(msd_store), "--model", "gru", "--quiet"]
    assert main([*argv, "--set", "data.context=3"]) == 2
    err = capsys.readouterr().err
    assert "too short to fit the 3 unknown parameters of 'msd'" in err
    assert "--set data.context=10" in err and len(err.splitlines()) == 1


def test_asking_noise_of_a_clean_store_is_one_line(msd_store, capsys):
    from warp_phys.cli import main

    argv = ["train", "--data", str(msd_store), "--model", "gru", "--quiet"]
    assert main([*argv, "--set", "data.noise=0.05"]) == 2
    err = capsys.readouterr().err
    assert "generated without observation noise" in err and len(err.splitlines()) == 1


@cache
def _noisy(name: str, n: int = 16, sigma: float = 0.05):
    """Clean test trajectories of `name` and observations with noise σ · (each state's std)."""
    system = get_system(name)
    params, y0 = system.sample(np.random.default_rng(2), n, "test")
    ts = system.times()
    ys = simulate(system, torch.as_tensor(y0), torch.as_tensor(params), ts)
    gen = torch.Generator().manual_seed(3)
    std = ys.std(dim=(0, 1))
    obs = (ys + sigma * std * torch.randn(ys.shape, generator=gen, dtype=ys.dtype)).float()
    return system, torch.as_tensor(params), ts, ys, obs


def _median_coefficient_error(form, fit, params) -> float:
    true = form.coefficients(params)
    est = torch.stack([fit.estimates[n].double() for n in form.names], -1)
    return float(((est - true).abs() / true.abs()).median())


def test_output_error_refinement_beats_the_integral_form_on_noisy_populations():
    # 5% noise on Lotka-Volterra: the integral form regresses on noisy states (biased), and
    # a forecast from the last noisy observation can start a population at zero, where it
    # stays (measured here: mean forecast MSE 4.6e13 -> 7.3e-5, median 0.082 -> 3.6e-5;
    # median coefficient error 1.06% -> 0.51%)
    system, params, ts, ys, obs = _noisy("lotka_volterra")
    L, form = 100, linear_form(system)
    plain = ode_fit(system, ts, obs, L)
    refined = ode_fit(system, ts, obs, L, refine=True)
    assert "output error" in refined.method and "output error" not in plain.method
    assert _median_coefficient_error(form, refined, params) < 0.6 * _median_coefficient_error(
        form, plain, params
    )
    mse = lambda fit: ((fit.forecast.double() - ys[:, L:]) ** 2).mean((1, 2))  # noqa: E731
    assert torch.isfinite(mse(refined)).all() and (refined.forecast >= 0).all()
    assert mse(refined).mean() < 0.1 * mse(plain).mean()
    assert mse(refined).median() < mse(plain).median()


def test_the_refined_path_stays_in_the_domain_and_a_clean_fit_stays_put():
    from warp_phys.identify import fit_coefficients, refine_output_error
    from warp_phys.physics import reference

    system, params, ts, ys, obs = _noisy("lotka_volterra")
    form, L = linear_form(system), 100
    w = 1.0 / reference(system).scale ** 2
    c0 = fit_coefficients(form, ts[:L], obs[:, :L].double(), w)
    c, path = refine_output_error(form, ts[:L], obs[:, :L].double(), c0, w)
    assert path.shape == (16, L, 2) and (path > 0).all()  # populations, fitted in log space
    # on clean data it only removes Simpson's error of the integral form (measured: median
    # relative error of the coefficients 1.5e-4 -> 2.6e-8; the path within 1.2e-7 of the data)
    c0 = fit_coefficients(form, ts[:L], ys[:, :L], w)
    c, path = refine_output_error(form, ts[:L], ys[:, :L], c0, w)
    true = form.coefficients(params)
    rel, rel0 = ((c - true).abs() / true.abs()), ((c0 - true).abs() / true.abs())
    assert rel.median() < 1e-6 and rel.max() <= rel0.max()
    assert (path - ys[:, :L]).abs().max() < 1e-5 * ys[:, :L].abs().max()


def test_warp_phys_with_refinement_is_the_refined_fit_in_context():
    # the lsq prior's θ holds the observations and refines at the end of the context: its
    # forecast and parameters are ode_fit's on noisy data, up to integrator rounding
    from warp_phys.root import build_root
    from warp_phys.warp import WARP

    system, params, ts, ys, obs = _noisy("lotka_volterra", n=8)
    L = 100
    fit = ode_fit(system, ts, obs, L, refine=True)
    root = build_root("lsq", state_dim=2, system=system, refine=30)
    model = WARP(
        root=root, state_dim=2, dt=float(ts[1] - ts[0]), transition="prior",
        init_state="learned", hold_after_context=True,
    )  # fmt: skip
    with torch.no_grad():
        pred = model(obs, context=L).mean[:, L - 1 :].double()  # predictions of y_L..
        got = model.physical_params(obs, L)
    size = ys[:, L:].abs().max()
    assert (pred - fit.forecast.double()).abs().amax((1, 2)).median() < 1e-3 * size
    for name in ("a", "b", "c", "d"):
        est = got[name][:, L - 1].double()
        assert ((est - fit.estimates[name].double()).abs() / est.abs()).max() < 1e-4, name
    plain = build_root("lsq", state_dim=2, system=system)
    assert root.n_weights == plain.n_weights + system.n_steps * 2 + 2 * 4 + 2 * 2 + 1


@pytest.mark.parametrize(("option", "value"), [("refine", -1), ("refine", True), ("window", 2)])
def test_lsq_refinement_options_are_checked(option, value):
    from warp_phys.root import build_root

    options = {"refine": 5, option: value}
    with pytest.raises(UserError, match=option):
        build_root("lsq", state_dim=2, system=get_system("lotka_volterra"), **options)


def test_output_error_is_not_tried_over_a_long_chaotic_context():
    # single shooting through 4.5 Lyapunov times of Lorenz-63 fits the noise (identify.py)
    system, _, ts, _, obs = _noisy("lorenz63", n=4)
    assert "output error" not in ode_fit(system, ts, obs, 500, refine=True).method
    assert "output error" in ode_fit(system, ts, obs, 100, refine=True).method  # 0.9 of one
