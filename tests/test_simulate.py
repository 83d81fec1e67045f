"""simulate(): bitwise batch independence, divergence and bad-input errors, integrator attrs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import warp_phys.simulate as sim
from warp_phys import DivergenceError, Fixed, Param, System, UserError, get_system, system_names
from warp_phys.simulate import integrator_attrs, simulate

pytestmark = pytest.mark.numerics  # also run under ATEN_CPU_CAPABILITY=default (.ci/run)

N_TRAJ = 70  # not a multiple of the SIMD padding, so padded lanes are exercised


def _sample(name: str, n: int = N_TRAJ, seed: int = 0) -> tuple[System, torch.Tensor, torch.Tensor]:
    system = get_system(name)
    params, y0 = system.sample(np.random.default_rng(seed), n, "train")
    return system, torch.tensor(y0), torch.tensor(params)


@pytest.mark.parametrize("name", system_names())
def test_trajectory_bytes_do_not_depend_on_batch_composition(name: str, monkeypatch) -> None:
    system, y0, params = _sample(name)
    ts = system.times()
    ts = ts[: max(2, len(ts) // 4)]  # the first quarter of the span is enough, and 4x cheaper
    whole = simulate(system, y0, params, ts, workers=1)
    # Shuffled, and split between two worker processes (allowed down to one trajectory each).
    monkeypatch.setattr(sim, "MIN_WORKER_BATCH", 1)
    perm = torch.randperm(N_TRAJ, generator=torch.Generator().manual_seed(0))
    shuffled = simulate(system, y0[perm], params[perm], ts, workers=2)
    assert torch.equal(shuffled, whole[perm])
    # In chunks, as the store writes them: a lone trajectory, and a chunk from the middle.
    for lo, hi in ((5, 6), (20, 33)):
        chunk = simulate(system, y0[lo:hi], params[lo:hi], ts, index_offset=lo, workers=1)
        assert torch.equal(chunk, whole[lo:hi])


def test_solver_arithmetic_is_elementwise_without_padding(monkeypatch) -> None:
    # Without the SIMD padding, lanes in scalar remainder loops must still round like the
    # vectorised ones. That holds for Lorenz-63's field and the solver's own elementwise ops
    # (mul, add, addcmul, sqrt, div) on torch's x86-64 builds, so a failure here means a
    # batch-shaped reduction crept into the solver.
    monkeypatch.setattr(sim, "LANES", 1)
    system, y0, params = _sample("lorenz63")
    ts = system.times()[:250]
    whole = simulate(system, y0, params, ts, workers=1)
    for lo, hi in ((5, 6), (20, 33)):
        assert torch.equal(simulate(system, y0[lo:hi], params[lo:hi], ts), whole[lo:hi])


def test_result_is_an_ordinary_tensor_usable_with_autograd() -> None:
    system, y0, params = _sample("msd", n=3)
    ys = simulate(system, y0, params, system.times())
    assert not ys.is_inference()
    w = torch.ones(2, dtype=torch.float64, requires_grad=True)
    (ys * w).sum().backward()  # would fail for an inference-mode tensor
    assert w.grad is not None


def test_saved_grid_starts_at_the_initial_state() -> None:
    system, y0, params = _sample("pendulum", n=5)
    ys = simulate(system, y0, params, system.times())
    assert torch.equal(ys[:, 0], y0)


def test_single_save_time_returns_the_initial_state() -> None:
    system, y0, params = _sample("msd", n=3)
    ys = simulate(system, y0, params, system.times()[:1])
    assert ys.shape == (3, 1, 2) and torch.equal(ys[:, 0], y0)


def test_torchdiffeq_method_agrees_with_default() -> None:
    system, y0, params = _sample("msd", n=8)
    ts = system.times()
    ours = simulate(system, y0, params, ts, rtol=1e-10, atol=1e-10)
    theirs = simulate(system, y0, params, ts, method="torchdiffeq:dopri5", rtol=1e-10, atol=1e-10)
    # Two different 5th/8th-order methods at rtol 1e-10: agreement to 1e-7 relative is ample.
    torch.testing.assert_close(theirs, ours, rtol=1e-7, atol=1e-7 * ours.abs().max().item())


class Blowup(System):
    """y' = a y^2: from y0 = 1 (a = 1) the solution 1 / (1 - t) blows up at t = 1."""

    state = ("y",)
    params = {"a": Param(1.0)}
    y0 = Fixed(1.0)
    t_span = (0.0, 2.0)
    n_steps = 21
    name = "blowup"

    def vector_field(self, t, y, p):
        return p.a[..., None] * y**2


@pytest.mark.parametrize("workers", [1, 2])  # with 2, the last trajectory is in a forked worker
def test_diverging_trajectory_names_system_index_params_and_time(workers: int, monkeypatch) -> None:
    monkeypatch.setattr(sim, "MIN_WORKER_BATCH", 1)
    system = Blowup()
    y0 = torch.tensor([[-1.0], [0.1], [1.0]], dtype=torch.float64)  # only the last one blows up
    params = torch.tensor([[1.0], [1.0], [1.0]], dtype=torch.float64)
    with pytest.raises(DivergenceError) as info:
        simulate(system, y0, params, system.times(), index_offset=40, workers=workers)
    message = str(info.value)
    assert "'blowup'" in message and "trajectory 42" in message and "a=1" in message
    assert "t=1 " in message or "t=0.99" in message
    assert "\n" not in message


def test_vector_field_not_finite_at_start_is_a_divergence() -> None:
    class NanField(Blowup):
        def vector_field(self, t, y, p):
            return torch.sqrt(y - 2.0)  # NaN below y = 2

    y0 = torch.tensor([[3.0], [1.0]], dtype=torch.float64)
    with pytest.raises(DivergenceError, match="trajectory 1 .*initial state"):
        simulate(NanField(), y0, torch.ones(2, 1, dtype=torch.float64), NanField().times())


def test_error_in_a_worker_process_reaches_the_caller(monkeypatch) -> None:
    class Fails(Blowup):
        def vector_field(self, t, y, p):
            if bool(((t >= 0.5) & (y[..., 0] > 0.3)).any()):  # y = 0.7 exp(-t) gets there
                raise ZeroDivisionError("the field failed")
            return -y

    monkeypatch.setattr(sim, "MIN_WORKER_BATCH", 1)
    y0 = torch.tensor([[0.1], [0.7]], dtype=torch.float64)  # the worker gets the second
    with pytest.raises(ZeroDivisionError, match="the field failed"):
        simulate(Fails(), y0, torch.ones(2, 1, dtype=torch.float64), Blowup().times(), workers=2)


def test_wrong_shape_vector_field_is_a_user_error() -> None:
    class Flat(Blowup):
        def vector_field(self, t, y, p):
            return y[..., 0]  # (B,) instead of (B, 1)

    y0, params = torch.ones(3, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)
    with pytest.raises(UserError, match=r"returned shape \(3,\).*shape \(3, 1\)"):
        simulate(Flat(), y0, params, Flat().times())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y0": torch.ones(2, 3, dtype=torch.float64)}, "y0 must have 1 states"),
        ({"params": torch.ones(2, 2, dtype=torch.float64)}, r"params must be a tensor .* \(2, 1\)"),
        ({"ts": torch.tensor([0.0, 1.0, 1.0])}, "strictly increasing"),
        ({"y0": torch.tensor([[1.0], [float("nan")]], dtype=torch.float64)}, "trajectory 1 is not"),
        ({"method": "rk45"}, "unknown integration method 'rk45'.*dop853"),
        ({"method": "torchdiffeq:nope"}, "dopri5"),
        ({"rtol": 0.0}, "rtol must be a positive"),
        ({"workers": 0}, "workers must be a positive integer"),
        ({"y0": torch.full((2, 1), 0.5), "params": torch.ones(2, 1)}, "finer than float32"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs: dict, match: str) -> None:
    args = {
        "y0": torch.full((2, 1), 0.5, dtype=torch.float64),
        "params": torch.ones(2, 1, dtype=torch.float64),
        "ts": torch.linspace(0.0, 1.0, 5, dtype=torch.float64),
    } | kwargs
    options = {k: args.pop(k) for k in ("method", "rtol", "workers") if k in args}
    with pytest.raises(UserError, match=match):
        simulate(Blowup(), args["y0"], args["params"], args["ts"], **options)


@pytest.mark.parametrize("method", ["dop853", "torchdiffeq:dopri5"])
def test_integrator_attrs_are_json_serialisable(method: str) -> None:
    attrs = integrator_attrs(method, 1e-8, 1e-9)
    assert json.loads(json.dumps(attrs)) == attrs
    assert attrs["method"] == method and attrs["rtol"] == 1e-8 and attrs["atol"] == 1e-9
    assert attrs["dtype"] == "float64" and attrs["tableau"]
    assert attrs["batch_independent"] is (method == "dop853")
