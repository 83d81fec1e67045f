"""GRU and LSTM forecasters: same interface and feeding semantics as WARP."""

from __future__ import annotations

import math

import pytest
import torch

from warp_phys.baselines import GRUForecaster, LSTMForecaster
from warp_phys.errors import UserError

MODELS = [GRUForecaster, LSTMForecaster]
EXACT = 1e-10  # float64: one fused call against step-by-step calls


def sines(B=4, T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, T, dtype=torch.float64)
    phase = torch.rand(B, 1, generator=g, dtype=torch.float64)
    return torch.stack((torch.sin(2 * math.pi * t + phase), torch.cos(2 * math.pi * t + phase)), -1)


def trained_looking(cls, **options):
    torch.manual_seed(0)
    model = cls(state_dim=2, hidden=8, **options).double()
    with torch.no_grad():
        model.head.weight.normal_()  # zero-init head would hide the recurrence
    return model


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("options", [{}, dict(time_input=False, residual=False, layers=2)])
def test_autoregressive_with_full_teacher_forcing_equals_teacher_forced(cls, options):
    model, ys = trained_looking(cls, **options), sines()
    tf = model(ys, context=ys.shape[1])
    assert tf.mean.shape == (4, 10, 2) and tf.std is None
    for context in (1, 4):
        ar = model(ys, context=context, teacher_prob=1.0)
        assert (ar.mean - tf.mean).abs().max() < EXACT


@pytest.mark.parametrize("cls", MODELS)
def test_forecast_feeds_its_own_predictions(cls):
    model, ys = trained_looking(cls), sines()
    tf = model(ys, context=ys.shape[1])
    ar = model(ys, context=4)
    assert torch.equal(ar.mean[:, :4], tf.mean[:, :4])  # context steps are the same
    assert (ar.mean[:, 5:] - tf.mean[:, 5:]).abs().max() > 1e-6
    other = ys.clone()
    other[:, 4:] += 1.0  # truth after the context is never seen
    assert torch.equal(model(other, context=4).mean, ar.mean)


@pytest.mark.parametrize("cls", MODELS)
def test_untrained_residual_model_is_persistence(cls):
    ys = sines()
    out = cls(state_dim=2, hidden=8).double()(ys, context=3)
    assert torch.equal(out.mean[:, :3], ys[:, :3]) and torch.equal(
        out.mean[:, 3:], ys[:, 2:3].expand(-1, 7, -1)
    )


def test_gru_loss_falls_on_a_small_sine_problem():
    torch.manual_seed(0)
    model = GRUForecaster(state_dim=2, hidden=16, residual=False)
    ys = sines(B=32, T=16).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = ((model(ys, context=16).mean - ys[:, 1:]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_n_params_and_bad_inputs():
    model = GRUForecaster(state_dim=2, hidden=8)
    assert model.n_params() == 3 * (3 * 8 + 8 * 8 + 2 * 8) + 8 * 2 + 2
    with pytest.raises(UserError, match="expects ys"):
        model(torch.zeros(2, 5, 3), context=2)
    with pytest.raises(UserError, match="hidden and layers >= 1"):
        LSTMForecaster(state_dim=2, hidden=0)


@pytest.mark.parametrize("kind", ["warp", "gru", "lstm"])
def test_every_model_kind_implements_the_forecaster_interface(kind, model_data):
    from warp_phys.config import ModelConfig
    from warp_phys.forecaster import AbstractForecaster
    from warp_phys.models import build_model

    model = build_model(ModelConfig(kind=kind), model_data(2))
    assert isinstance(model, AbstractForecaster)
    ys = torch.randn(3, 6, 2)
    out = model(ys, context=3, horizon=2)
    assert out.mean.shape == (3, 4, 2)  # predictions of ys[:, 1:5]
    assert model.physical_params(ys, 3) == {} and model.penalty(ys) is None
    assert model.learned_names() is None and model.n_params() > 0
