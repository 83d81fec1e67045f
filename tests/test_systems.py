"""Every system integrates like the reference; symbolic systems match hand-written ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from warp_phys import System, get_system, system_names
from warp_phys.simulate import simulate

pytestmark = pytest.mark.numerics  # also run under ATEN_CPU_CAPABILITY=default (.ci/run)

# The reference: scipy's DOP853 at tight tolerances (house style).
REF_RTOL, REF_ATOL = 1e-10, 1e-12
# Our solver runs the same method at the same tolerances, so only rounding and the step
# sequences it perturbs separate the two: measured <= 3e-10 relative even for Lorenz-63's
# chaotic 10 time units; 1e-8 leaves room for other seeds and machines.
MATCH_RTOL = 1e-8
N_PER_SPLIT = 3  # trajectories per split, from the train and the wider test_ood ranges


def _reference(system: System, y0: np.ndarray, params: np.ndarray, ts: torch.Tensor) -> np.ndarray:
    """Integrate one trajectory with scipy, the vector field called one state at a time."""
    p = torch.as_tensor(params)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        return system.f(torch.tensor(t), torch.as_tensor(y), p).numpy()

    t = ts.numpy()
    sol = solve_ivp(rhs, (t[0], t[-1]), y0, method="DOP853", rtol=REF_RTOL, atol=REF_ATOL, t_eval=t)
    assert sol.success, sol.message
    return sol.y.T  # (T, S)


@pytest.mark.parametrize("name", system_names())
@pytest.mark.parametrize("split", ["train", "test_ood"])
def test_simulation_matches_scipy_dop853(name: str, split: str) -> None:
    system = get_system(name)
    params, y0 = system.sample(np.random.default_rng(0), N_PER_SPLIT, split)
    ts = system.times()
    ys = simulate(system, torch.tensor(y0), torch.tensor(params), ts, rtol=REF_RTOL, atol=REF_ATOL)
    assert ys.shape == (N_PER_SPLIT, len(ts), system.state_dim)
    assert ys.dtype == torch.float64
    for b in range(N_PER_SPLIT):
        ref = _reference(system, y0[b], params[b], ts)
        err = np.abs(ys[b].numpy() - ref).max()
        assert err <= MATCH_RTOL * (1 + np.abs(ref).max()), f"trajectory {b}: max error {err:.3g}"


# The MSD is linear, y' = M y with M = [[0, 1], [-k/m, -c/m]]: y(t) = exp(M t) y0 exactly.
# Bounds on max |error| / (1 + max |y|), over the wider test_ood ranges.
@pytest.mark.parametrize(
    ("rtol", "atol", "bound"),
    [
        (1e-8, 1e-8, 1e-6),  # the generation defaults: measured 4e-8
        (1e-12, 1e-12, 1e-10),  # tight: measured 4e-12
    ],
)
def test_msd_matches_matrix_exponential(rtol: float, atol: float, bound: float) -> None:
    if "msd" not in system_names():
        pytest.skip("no msd system registered")
    system = get_system("msd")
    params, y0 = system.sample(np.random.default_rng(1), 16, "test_ood")
    params, y0 = torch.tensor(params), torch.tensor(y0)
    ts = system.times()
    ys = simulate(system, y0, params, ts, rtol=rtol, atol=atol)
    p = system.view(params)
    zero, one = torch.zeros_like(p.m), torch.ones_like(p.m)
    M = torch.stack((torch.stack((zero, one), -1), torch.stack((-p.k / p.m, -p.c / p.m), -1)), -2)
    expm = torch.linalg.matrix_exp(M[:, None] * ts[None, :, None, None])  # (B, T, 2, 2)
    exact = (expm @ y0[:, None, :, None]).squeeze(-1)  # (B, T, 2)
    assert (ys - exact).abs().max() <= bound * (1 + exact.abs().max())


# Hand-written vector fields of the symbolic built-ins, term for term in sympy's order, so that
# both forms do the same floating-point operations and give bitwise-equal trajectories.
def _lorenz63(t, y, p):
    x, yy, z = y.unbind(-1)
    return torch.stack((p.sigma * (-x + yy), x * (p.rho - z) - yy, -p.beta * z + x * yy), -1)


def _lotka_volterra(t, y, p):
    x, yy = y.unbind(-1)
    return torch.stack((p.a * x - p.b * x * yy, p.c * x * yy - p.d * yy), -1)


HAND_WRITTEN = {"lorenz63": _lorenz63, "lotka_volterra": _lotka_volterra}


def _hand_written(name: str) -> System:
    symbolic = type(get_system(name))
    attrs = {k: getattr(symbolic, k) for k in ("state", "params", "y0", "t_span", "n_steps")}
    field = HAND_WRITTEN[name]

    def vector_field(self, t, y, p):
        return field(t, y, p)

    return type(f"HandWritten_{name}", (System,), {**attrs, "vector_field": vector_field})()


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_symbolic_system_matches_hand_written_field(name: str) -> None:
    symbolic, hand = get_system(name), _hand_written(name)
    params, y0 = symbolic.sample(np.random.default_rng(2), 5, "train")
    params, y0, ts = torch.tensor(params), torch.tensor(y0), symbolic.times()
    assert torch.equal(symbolic.f(ts[3], y0, params), hand.f(ts[3], y0, params))
    assert torch.equal(simulate(symbolic, y0, params, ts), simulate(hand, y0, params, ts))


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_symbolic_jacobian_matches_autograd(name: str) -> None:
    system = get_system(name)
    params, y0 = system.sample(np.random.default_rng(3), 4, "train")
    pview = system.view(torch.tensor(params))
    y, t = torch.tensor(y0), torch.tensor(0.5, dtype=torch.float64)
    derived = system.jacobian(t, y, pview)
    autograd = System.jacobian(system, t, y, pview)  # the base class differentiates f
    assert derived.shape == (4, system.state_dim, system.state_dim)
    torch.testing.assert_close(derived, autograd, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_symbolic_latex_has_one_string_per_state(name: str) -> None:
    lines = get_system(name).latex()
    assert len(lines) == get_system(name).state_dim
    assert all(isinstance(line, str) and line for line in lines)
