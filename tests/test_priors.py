"""Physics priors (ode, hybrid, sine) and the RK4 stepper they share.

Parametrised over the system registry, so a new system file is covered with no test edits.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch

from warp_phys.errors import UserError
from warp_phys.integrate import euler, rk4
from warp_phys.physics import reference
from warp_phys.root import build_root, prior_names
from warp_phys.simulate import simulate
from warp_phys.system import get_system, system_names

SYSTEMS = system_names()
ONE_STEP_TOL = 1e-5  # RK4 local error at the auto substeps (measured <= 5e-6), relative to max |y|
ROLLOUT_TOL = 1e-4  # global error after ROLLOUT_STEPS (measured <= 3e-5), relative to max |y|
ROLLOUT_STEPS = 128  # Lorenz-63 amplifies errors ~e^0.9 per time unit: 128 steps = 1.3 units
MAX_STEPS = 256  # cap on the grid simulated here (Lorenz has 1000 steps; cost only)
FIT_STEPS = 64  # time steps per trajectory in the tiny fitting problems


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run these tiny-tensor tests on one thread: on 2 busy shared cores, OpenMP fan-out of
    (128, 2) ops costs milliseconds each (torch.tanh: 5 ms with 2 threads, 14 us with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dt(system) -> float:
    return (system.t_span[1] - system.t_span[0]) / (system.n_steps - 1)


@cache
def _data(name: str, frac: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return params (2, P) and trajectories (2, T, S) in float64 from the train split.

    frac: put every ranged parameter at low + frac·(high - low), shared by both trajectories.
    """
    system = get_system(name)
    rng = np.random.default_rng(0)
    params, y0 = system.sample(rng, 2, "train")
    if frac is not None:
        lo, hi = np.array(list(system.ranges("train").values())).T
        params[:] = lo + frac * (hi - lo)
        y0 = system.initial_state(system.initial_states("train").sample(rng, 2), params)
    ts = system.times()[:MAX_STEPS]
    p = torch.as_tensor(params)
    return p, simulate(system, torch.as_tensor(y0), p, ts)


def _taus(T: int, n_steps: int) -> torch.Tensor:
    return torch.arange(1, T, dtype=torch.float64) / (n_steps - 1)  # τ_{t+1}, (T-1,)


# -- the stepper ----------------------------------------------------------------------------
def test_rk4_matches_matrix_exponential_with_fourth_order_error():
    A = torch.tensor([[0.0, 1.0], [-400.0, -2.0]], dtype=torch.float64)  # damped, ω = 20
    y0 = torch.tensor([[1.0, 0.0], [0.3, -5.0]], dtype=torch.float64)
    dt = 0.05
    exact = y0 @ torch.linalg.matrix_exp(A * dt).T

    def err(n):
        return ((rk4(lambda y: y @ A.T, y0, dt, n) - exact).abs().max() / exact.abs().max()).item()

    assert err(64) < 1e-9  # h·ω = 0.016: (hω)^5/120 per step, 64 steps
    assert 12 < err(8) / err(16) < 20  # 2^4 = 16: fourth order
    assert (
        1.6
        < (euler(lambda y: y @ A.T, y0, dt, 512) - exact).abs().max().item()
        / (euler(lambda y: y @ A.T, y0, dt, 1024) - exact).abs().max().item()
        < 2.4
    )  # first order


def test_rk4_non_autonomous_uses_per_sample_start_time():
    t0 = torch.tensor([0.0, 0.7, 2.0], dtype=torch.float64)
    y = rk4(
        lambda t, y: torch.cos(t).unsqueeze(-1),
        torch.zeros(3, 1, dtype=torch.float64),
        0.1,
        4,
        t0=t0,
    )
    assert torch.allclose(y[:, 0], torch.sin(t0 + 0.1) - torch.sin(t0), atol=1e-10)


def test_rk4_is_differentiable():
    k = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64, requires_grad=True)

    def step(k, y0):
        return rk4(lambda y: torch.stack((y[:, 1], -k * y[:, 0]), -1), y0, 0.3, 3)

    assert torch.autograd.gradcheck(step, (k, y0))


def test_rk4_rejects_bad_substeps():
    with pytest.raises(ValueError, match="substeps must be an integer >= 1"):
        rk4(lambda y: y, torch.zeros(1, 1), 0.1, 0)


# -- ode prior -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SYSTEMS)
def test_ode_prior_with_true_parameters_reproduces_simulator(name):
    system = get_system(name)
    root = build_root("ode", state_dim=system.state_dim, system=system).double()
    params, ys = _data(name)  # (B, P), (B, T, S)
    B, T, S = ys.shape
    theta = root.weights_for(params)  # (B, D): the network outputs the true parameters
    taus, dt, size = _taus(T, system.n_steps), _dt(system), ys.abs().amax((0, 1))
    got = root.physical_params(theta, taus[:B], ys[:, 0])
    for i, pname in enumerate(system.param_names):
        assert torch.allclose(got[pname], params[:, i], rtol=1e-6), pname

    one, _ = root(theta.repeat_interleave(T - 1, 0), taus.repeat(B), ys[:, :-1].reshape(-1, S), dt)
    assert ((one.view(B, T - 1, S) - ys[:, 1:]).abs() / size).max() < ONE_STEP_TOL

    y, n = ys[:, 0], min(T - 1, ROLLOUT_STEPS)
    for t in range(n):
        y, _ = root(theta, taus[t].expand(B), y, dt)
    assert ((y - ys[:, n]).abs() / size).max() < ROLLOUT_TOL


@pytest.mark.parametrize("name", SYSTEMS)
def test_ode_prior_starts_at_prior_centre(name):
    system = get_system(name)
    root = build_root("ode", state_dim=system.state_dim, system=system)
    theta = root.init_weights(torch.Generator().manual_seed(0)).unsqueeze(0)
    assert theta.dtype == torch.float32 and theta.shape == (1, root.n_weights)
    got = root.physical_params(theta, torch.zeros(1), torch.zeros(1, system.state_dim))
    for pname, p in system.params.items():
        lo, hi = p.range("train")
        centre = math.sqrt(lo * hi) if p.is_positive else (lo + hi) / 2
        assert got[pname].item() == pytest.approx(
            centre if pname in root.params.learn else p.default, rel=1e-5
        )


def test_ode_prior_fixed_and_learn_options():
    system = get_system("msd")
    root = build_root("ode", state_dim=2, system=system, fixed={"m": 0.05}, inputs="tau_y", depth=2)
    assert root.params.learn == ("k", "c")
    theta = root.init_weights().expand(3, -1)
    got = root.physical_params(theta, torch.rand(3), torch.randn(3, 2))
    assert torch.equal(got["m"], torch.full((3,), 0.05))
    only_k = build_root("ode", state_dim=2, system=system, learn=["k"])
    assert only_k.params.learn == ("k",)
    assert only_k.physical_params(only_k.init_weights()[None], torch.zeros(1), torch.zeros(1, 2))[
        "c"
    ].item() == pytest.approx(0.1)


@pytest.mark.parametrize("prior", ["ode", "hybrid"])
def test_physics_priors_predict_a_positive_std_on_request(prior):
    system = get_system("msd")
    root = build_root(prior, state_dim=2, system=system, predict_std=True)
    plain = build_root(prior, state_dim=2, system=system)
    assert root.physical_units and root.n_weights == plain.n_weights + 2 * (32 + 1)
    tau, y = torch.rand(4), torch.randn(4, 2)
    mean, std = root(root.init_weights().expand(4, -1), tau, y, 1 / 255)
    plain_mean, plain_std = plain(plain.init_weights().expand(4, -1), tau, y, 1 / 255)
    assert std.shape == (4, 2) and (std > 0).all() and plain_std is None
    assert torch.allclose(mean, plain_mean)  # the std head leaves the physics alone


def test_ode_prior_rollout_cannot_gain_energy_on_msd_at_any_weights():
    """With c/m >= 0 by construction and h·ρ <= 1, RK4 never adds energy, whatever θ."""
    root = build_root("ode", state_dim=2, system=get_system("msd")).double()
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(256, root.n_weights, generator=g, dtype=torch.float64) * 100
    p = root.physical_params(theta, torch.zeros(256), torch.zeros(256, 2))
    y = torch.randn(256, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 16.0], dtype=torch.float64
    )

    def energy(y):
        return 0.5 * (p["k"] * y[:, 0] ** 2 + p["m"] * y[:, 1] ** 2)

    e0, worst = energy(y), torch.zeros(256, dtype=torch.float64)
    for t in range(255):
        y, _ = root(theta, torch.full((256,), (t + 1) / 255, dtype=torch.float64), y, 1 / 255)
        worst = torch.maximum(worst, energy(y) / e0)
    assert worst.max() <= 1 + 1e-9


# -- learning on tiny problems ----------------------------------------------------------------
def _fit(root, ys, dt, n_steps, *, penalty=0.0, steps=100, lr=1e-2):
    """Fit one shared θ by Adam on the one-step loss; return θ and the losses."""
    B, T, S = ys.shape
    theta = root.init_weights(torch.Generator().manual_seed(0)).clone().requires_grad_(True)
    x, y = ys[:, :-1].reshape(-1, S), ys[:, 1:].reshape(-1, S)  # (B·(T-1), S)
    taus, size = _taus(T, n_steps).float().repeat(B), ys.abs().amax((0, 1))
    opt = torch.optim.Adam([theta], lr=lr)
    losses = []
    for _ in range(steps):
        th = theta.expand(len(x), -1)
        mean, _ = root(th, taus, x, dt)
        loss = ((mean - y) / size).square().mean()
        losses.append(loss.item())
        if penalty:
            loss = loss + penalty * root.penalty(th, taus, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return theta.detach(), losses


def _fit_case(prior, name, **options):
    system = get_system(name)
    params, ys = _data(name, frac=0.8)  # shared off-centre parameters: the prior starts wrong
    root = build_root(prior, state_dim=system.state_dim, system=system, **options)
    theta, losses = _fit(root, ys[:, : FIT_STEPS + 1].float(), _dt(system), system.n_steps,
                         penalty=1e-3 if prior == "hybrid" else 0.0)  # fmt: skip
    return system, root, params[0], theta, losses


@pytest.mark.parametrize("name", SYSTEMS)
def test_ode_prior_loss_falls(name):
    _, _, _, _, losses = _fit_case("ode", name)
    assert losses[-1] < losses[0] / 100  # measured: 1e3 to 1e5 on the full grids


def test_ode_prior_recovers_msd_stiffness_ratio():
    system, root, true, theta, losses = _fit_case("ode", "msd")
    p = root.physical_params(theta[None], torch.ones(1), torch.zeros(1, 2))
    km, km_true, km_init = (
        (p["k"] / p["m"]).item(),
        (true[1] / true[0]).item(),
        8 / math.sqrt(0.02 * 0.04),
    )
    assert abs(km - km_true) < 0.1 * abs(km_init - km_true)
    assert abs(km / km_true - 1) < 0.02


def _autonomous_terms(system) -> list[str]:
    """Ranged parameters whose term in the field does not depend on t (the hybrid residual is a
    function of the state only, so only such a term can be learned back when dropped)."""
    ref = reference(system)
    p = system.default_params().expand(len(ref.t), -1)
    out = []
    for j, n in enumerate(system.param_names):
        if system.params[n].train is None:
            continue
        q = p.clone()
        q[:, j] = 0.0
        term = [system.f(ref.t + dt, ref.y, p) - system.f(ref.t + dt, ref.y, q) for dt in (0, 0.37)]
        if torch.allclose(term[0], term[1], rtol=1e-9, atol=1e-12):
            out.append(n)
    return out


@pytest.mark.parametrize("name", SYSTEMS)
def test_hybrid_prior_loss_falls_with_a_term_dropped(name):
    system = get_system(name)
    ranged = [n for n, p in system.params.items() if p.train is not None]
    autonomous = _autonomous_terms(system)
    if len(ranged) < 2 or not autonomous:
        pytest.skip(f"{name}: no second learned parameter with a state-only term to drop")
    _, root, _, theta, losses = _fit_case("hybrid", name, drop=[autonomous[-1]])
    assert losses[-1] < losses[0] / 20  # measured: 1e2 to 1e4
    assert (
        root.physical_params(theta[None], torch.ones(1), torch.zeros(1, root.system.state_dim))[
            autonomous[-1]
        ]
        == 0
    )


def test_hybrid_prior_starts_as_the_known_physics_with_zero_penalty():
    system = get_system("msd")
    hybrid = build_root("hybrid", state_dim=2, system=system, drop=["c"])
    ode = build_root("ode", state_dim=2, system=system, fixed={"c": 0.0})
    th_h, th_o = hybrid.init_weights().expand(4, -1), ode.init_weights().expand(4, -1)
    y, tau = torch.randn(4, 2), torch.rand(4)
    assert torch.allclose(hybrid(th_h, tau, y, 1 / 255)[0], ode(th_o, tau, y, 1 / 255)[0])
    assert torch.equal(hybrid.penalty(th_h, tau, y), torch.zeros(4))
    assert (hybrid.penalty(th_h + 0.1, tau, y) > 0).all()


def test_sine_prior_loss_falls_and_recovers_phase():
    _, root, true, theta, losses = _fit_case("sine", "sine")
    assert losses[-1] < losses[0] / 100
    phase = root.physical_params(theta[None], torch.ones(1), torch.zeros(1, 1))["phase"]
    assert phase.item() == pytest.approx(true[0].item(), abs=0.02)


def test_sine_prior_is_exact_given_the_phase():
    root = build_root("sine", state_dim=1, system=get_system("sine")).double()
    params, ys = _data("sine")  # (2, 1), (2, 16, 1)
    theta = root.init_weights().double().expand(2, -1).clone()
    theta[:, -1] = params[:, 0]  # last bias = phase
    taus = _taus(16, 16)
    mean, std = root(
        theta.repeat_interleave(15, 0), taus.repeat(2), ys[:, :-1].reshape(-1, 1), 1 / 15
    )
    assert std is None
    assert torch.allclose(mean.view(2, 15, 1), ys[:, 1:], atol=1e-7)


# -- every registered prior -------------------------------------------------------------------
@pytest.mark.parametrize("prior", prior_names())
@pytest.mark.parametrize("name", SYSTEMS)
def test_every_prior_honours_the_root_contract(prior, name):
    """Shapes, dtypes and finiteness at the default weights, for each prior x system pair."""
    system = get_system(name)
    try:
        root = build_root(prior, state_dim=system.state_dim, system=system)
    except UserError as err:
        pytest.skip(f"{prior} does not apply to {name}: {err}")
    theta0 = root.init_weights(torch.Generator().manual_seed(0))
    assert theta0.shape == (root.n_weights,) and theta0.dtype == torch.float32
    B, S = 5, system.state_dim
    y = reference(system).y[:B].float()  # (B, S)
    mean, std = root(theta0.expand(B, -1), torch.rand(B), y, _dt(system))
    assert mean.shape == (B, S) and torch.isfinite(mean).all()
    assert std is None or (std.shape == (B, S) and (std > 0).all())
    for value in root.physical_params(theta0.expand(B, -1), torch.rand(B), y).values():
        assert value.shape == (B,) and torch.isfinite(value).all()


# -- robustness and bad input -----------------------------------------------------------------
def _roots():
    for prior in ("ode", "hybrid", "sine"):
        for name in SYSTEMS:
            if prior != "sine" or get_system(name).state_dim == 1:
                yield prior, name


@pytest.mark.parametrize(("prior", "name"), list(_roots()))
def test_outputs_and_gradients_finite_at_extreme_weights(prior, name):
    system = get_system(name)
    root = build_root(prior, state_dim=system.state_dim, system=system)
    g = torch.Generator().manual_seed(0)
    ref = reference(system)
    y = ref.y[
        torch.randint(len(ref.y), (32,), generator=g)
    ].float()  # states on the system's orbits
    base = root.init_weights(g)
    for theta in (base * 100, torch.randn(32, root.n_weights, generator=g) * 100, -base * 1e4):
        theta = theta.expand(32, -1).clone().requires_grad_(True)
        mean, _ = root(theta, torch.rand(32, generator=g), y, _dt(system))
        mean.square().sum().backward()
        assert torch.isfinite(mean).all() and torch.isfinite(theta.grad).all()
        assert all(
            torch.isfinite(v).all() for v in root.physical_params(theta, torch.rand(32), y).values()
        )


def test_unknown_system_or_prior_is_a_user_error():
    with pytest.raises(UserError, match="unknown system 'nope'.*msd"):
        build_root("ode", state_dim=2, system_name="nope")
    with pytest.raises(UserError, match="unknown prior 'nope'.*ode"):
        build_root("nope", state_dim=2)
    with pytest.raises(UserError, match="prior 'ode' needs a system"):
        build_root("ode", state_dim=2)


def test_state_dimension_mismatch_is_a_user_error():
    with pytest.raises(
        UserError, match="prior 'ode' for system 'msd' has 2 states .* but the dataset has 3"
    ):
        build_root("ode", state_dim=3, system_name="msd")
    with pytest.raises(UserError, match="prior 'hybrid' for system 'lorenz63' has 3 states"):
        build_root("hybrid", state_dim=2, system=get_system("lorenz63"))


def test_hybrid_without_known_terms_is_a_user_error():
    with pytest.raises(UserError, match="hybrid prior needs at least one known term"):
        build_root("hybrid", state_dim=2)
    with pytest.raises(UserError, match="hybrid prior needs at least one known term"):
        build_root("hybrid", state_dim=2, system_name="lotka_volterra", drop=["a", "b", "c", "d"])
    with pytest.raises(UserError, match="not finite with drop=\\['m'\\]"):
        build_root("hybrid", state_dim=2, system_name="msd", drop=["m"])


def test_sine_prior_needs_one_state():
    with pytest.raises(UserError, match="prior 'sine' predicts one state but the dataset has 2"):
        build_root("sine", state_dim=2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"learn": ["q"]}, "learn names unknown parameters \\['q'\\].*m, k, c"),
        ({"fixed": {"m": 0.03}, "learn": ["m", "k"]}, "\\['m'\\] are in both learn and fixed"),
        ({"learn": []}, "nothing to learn"),
        ({"inputs": "y"}, "inputs must be one of const, tau, tau_y"),
        ({"substeps": 0}, "substeps must be 'auto' or an integer >= 1"),
        ({"spread": {"k": -1.0}}, "spread of 'k' must be a positive number"),
        ({"state_scale": [1.0]}, "state_scale must be 'auto', None or 2 positive numbers"),
        ({"integrator": "dopri5"}, "integrator must be one of rk4, euler"),
        ({"fixed": {"m": 0.0}}, "not finite"),
    ],
)
def test_ode_prior_bad_options_are_user_errors(options, match):
    with pytest.raises(UserError, match=match):
        build_root("ode", state_dim=2, system_name="msd", **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("prior", "name"), [("ode", "msd"), ("ode", "lorenz63"), ("hybrid", "msd"), ("sine", "sine")]
)
def test_priors_run_on_cuda_like_on_cpu(prior, name):
    system = get_system(name)
    root = build_root(prior, state_dim=system.state_dim, system=system)
    g = torch.Generator().manual_seed(0)
    ref = reference(system)
    y = ref.y[torch.randint(len(ref.y), (16,), generator=g)].float()  # (16, S)
    theta = root.init_weights(g) + 0.1 * torch.randn(16, root.n_weights, generator=g)
    tau = torch.rand(16, generator=g)
    cpu, _ = root(theta, tau, y, _dt(system))
    root.cuda()
    theta_gpu = theta.cuda().requires_grad_(True)
    gpu, _ = root(theta_gpu, tau.cuda(), y.cuda(), _dt(system))
    gpu.square().sum().backward()
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5 * float(cpu.abs().max()))
    assert torch.isfinite(theta_gpu.grad).all()
    params = root.physical_params(theta_gpu, tau.cuda(), y.cuda())
    assert all(v.device.type == "cuda" and v.shape == (16,) for v in params.values())


# -- lsq: the normal equations in θ ---------------------------------------------------------
# median relative error of the coefficients: Simpson's rule on the stored grids (measured <= 2e-4;
# single Lotka-Volterra trajectories with a small prey growth rate reach 4e-2, an ill-conditioned
# fit, not a bug: the median is what is promised)
LSQ_COEFF_TOL = 2e-3
LSQ_FORECAST_TOL = 1e-3  # 32 forecast steps, relative to the states' size (measured 2e-5)


def _lsq_model(system, **options):
    from warp_phys.warp import WARP

    root = build_root("lsq", state_dim=system.state_dim, system=system, **options)
    model = WARP(
        root=root, state_dim=system.state_dim, dt=_dt(system), transition="prior",
        init_state="learned", hold_after_context=True,
    )  # fmt: skip
    return root, model


def _linear_systems():
    from warp_phys.identify import linear_form

    return [n for n in SYSTEMS if linear_form(get_system(n)) is not None]


@pytest.mark.parametrize("name", _linear_systems())
def test_lsq_prior_is_the_exact_fit_before_any_training(name):
    system = get_system(name)
    params, y0 = system.sample(np.random.default_rng(3), 8, "test_ood")
    ts = system.times()
    ys = simulate(system, torch.as_tensor(y0), torch.as_tensor(params), ts).float()
    root, model = _lsq_model(system)
    L = system.n_steps // 2
    H = min(32, system.n_steps - L)
    with torch.no_grad():
        out = model(ys, context=L, horizon=H)
        est = model.physical_params(ys, L)
    true = root.form.coefficients(torch.as_tensor(params))
    for k, n in enumerate(root.names):
        rel = (est[n][:, L - 1].double() - true[:, k]).abs() / true[:, k].abs()
        assert rel.median() < LSQ_COEFF_TOL and rel.isfinite().all(), (n, rel)
    err = (out.mean[:, L - 1 :] - ys[:, L : L + H]).abs().amax((1, 2))  # (B,)
    assert err.median() < LSQ_FORECAST_TOL * ys[:, L : L + H].abs().max()


def test_lsq_learns_only_its_mixture_and_never_moves_the_sums():
    system = get_system("pendulum")
    root, model = _lsq_model(system)
    ys = _data("pendulum")[1].float()  # whole trajectories: the prior maps τ onto the grid
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = (model(ys, context=ys.shape[1]).mean - ys[:, 1:]).square().mean()
    loss.backward()
    opt.step()
    theta0 = model.initial_state(ys[:, 0])[0]
    moved = (theta0 != root.init_weights()).nonzero().flatten()
    logits = root.slots["logits"]
    assert len(moved) and all(logits.start <= i < logits.stop for i in moved.tolist())
    assert not model.input_map.requires_grad  # B is fixed by the prior


def test_lsq_filters_give_a_better_forecast_start_on_noisy_data():
    system = get_system("msd_zero")
    params, y0 = system.sample(np.random.default_rng(4), 64, "test")
    clean = simulate(system, torch.as_tensor(y0), torch.as_tensor(params), system.times())
    gen = torch.Generator().manual_seed(0)
    noisy = (clean + 0.05 * clean.std((0, 1)) * torch.randn(clean.shape, generator=gen)).float()
    root, model = _lsq_model(system)
    L, errs = 100, {}
    for name, pick in (("last value", 0), ("filtered", 3)):
        logits = torch.zeros(root.n_bank, system.state_dim)
        logits[pick] = 30.0
        with torch.no_grad():
            model.theta0[root.slots["logits"]] = logits.flatten()
            start = model(noisy, context=L, horizon=1).mean[:, L - 1]
        errs[name] = (start - clean[:, L]).square().mean().item()
    assert errs["filtered"] < errs["last value"] / 3  # measured: 8x


def test_lsq_needs_its_own_recurrence_and_a_linear_system():
    from warp_phys.warp import WARP

    system = get_system("pendulum")
    root = build_root("lsq", state_dim=2, system=system)
    with pytest.raises(UserError, match='set transition = "prior"'):
        WARP(root=root, state_dim=2, dt=0.1, transition="rotation")
    with pytest.raises(UserError, match='transition "prior" needs a prior'):
        WARP(root=build_root("blackbox", state_dim=2), state_dim=2, dt=0.1, transition="prior")
    with pytest.raises(UserError, match="needs a system linear in its unknown"):
        build_root("lsq", state_dim=1, system=get_system("sine"))
    with pytest.raises(UserError, match="smoothing values must lie in"):
        build_root("lsq", state_dim=2, system=system, smoothing=[0.5, 1.0])
