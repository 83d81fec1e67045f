"""Build a forecaster (WARP with a prior, GRU, LSTM) from a `ModelConfig` and a dataset."""

from __future__ import annotations

import torch
from torch import Tensor

from warp_phys.config import ModelConfig
from warp_phys.data import Dataset
from warp_phys.errors import UserError
from warp_phys.forecaster import AbstractForecaster, Forecast

MODEL_KINDS = ("warp", "gru", "lstm")


class Standardized(AbstractForecaster):
    """Wrap a forecaster so that it sees standardised states and answers in physical units.

    Physics priors never come wrapped (their equations hold in physical units); a wrapped
    model's physical parameters would be in standardised units, so none are reported."""

    def __init__(self, inner: AbstractForecaster, offset: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.state_dim = inner.state_dim
        self.register_buffer("offset", offset.clone())  # (S,)
        self.register_buffer("scale", scale.clone())  # (S,)

    def forward(
        self,
        ys: Tensor,
        *,
        context: int,
        teacher_prob: float = 0.0,
        generator: torch.Generator | None = None,
        horizon: int | None = None,
    ) -> Forecast:
        out = self.inner(
            (ys - self.offset) / self.scale, context=context, teacher_prob=teacher_prob,
            generator=generator, horizon=horizon,
        )  # fmt: skip
        std = None if out.std is None else out.std * self.scale
        return Forecast(out.mean * self.scale + self.offset, std)

    def penalty(self, ys: Tensor) -> Tensor | None:
        return self.inner.penalty((ys - self.offset) / self.scale)

    def n_params(self) -> int:
        return self.inner.n_params()


def build_model(cfg: ModelConfig, data: Dataset) -> AbstractForecaster:
    """Return the forecaster `cfg` describes, sized for `data`."""
    from warp_phys.baselines import GRUForecaster, LSTMForecaster
    from warp_phys.root import PRIORS, build_root
    from warp_phys.runtime import Runtime
    from warp_phys.warp import WARP

    if cfg.kind not in MODEL_KINDS:
        raise UserError(f"unknown model {cfg.kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    physical = False
    if cfg.kind == "warp":
        root_cls = PRIORS.get(cfg.prior)
        physical = root_cls.physical_units
        root = build_root(
            cfg.prior, state_dim=data.state_dim, system=data.system, **cfg.prior_options
        )
        root.standardized = bool(cfg.normalize and not physical)
        model = WARP(
            root=root,
            state_dim=data.state_dim,
            dt=data.dt,
            transition=cfg.transition,
            anchored=cfg.anchored,
            init_state=cfg.init_state,
            hold_after_context=cfg.hold_after_context,
            transition_options=cfg.transition_options,
            time_channel=cfg.time_channel,
            runtime=Runtime(
                precision=cfg.precision,
                pad_to=cfg.pad_to,
                scan_method=cfg.scan_method,
                checkpoint_every=cfg.checkpoint_every,
                prefix_chunk=cfg.prefix_chunk,
                compile_root=cfg.compile,
            ),  # fmt: skip
        )
    elif cfg.kind == "gru":
        model = GRUForecaster(state_dim=data.state_dim, hidden=cfg.hidden)
    else:
        model = LSTMForecaster(state_dim=data.state_dim, hidden=cfg.hidden)
    if cfg.normalize and not physical:
        model = Standardized(model, data.offset(), data.scale())
    return model
