"""GRU and LSTM forecasters behind the same interface as WARP.

    h_t = cell(h_{t-1}, [x_t, τ_t])       x_t the value fed at step t, τ_t = t / (T - 1)
    ŷ_{t+1} = x_t + head(h_t)             (residual=True; head(h_t) alone when False)

Teacher forcing and context follow CONTRACTS.md exactly as WARP does: steps t < context are
fed the truth and run as one cuDNN-style call over the whole prefix; the forecast steps run
one at a time with the same module, fed the previous prediction (or, per sample with
probability `teacher_prob`, the truth). The head is zero-initialised, so with `residual` an
untrained model is the persistence forecast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from warp_phys.errors import UserError
from warp_phys.forecaster import AbstractForecaster, Forecast, feed


class _RecurrentForecaster(AbstractForecaster):
    rnn_type: type[nn.RNNBase]

    def __init__(
        self,
        *,
        state_dim: int,
        hidden: int = 128,
        layers: int = 1,
        time_input: bool = True,
        residual: bool = True,
    ) -> None:
        """Args:
        state_dim: S, number of observed states.
        hidden: hidden size of the recurrent cell.
        layers: stacked recurrent layers.
        time_input: feed τ_t beside x_t.
        residual: predict the increment y_{t+1} - x_t instead of y_{t+1}.
        """
        super().__init__()
        if state_dim < 1 or hidden < 1 or layers < 1:
            raise UserError(
                f"{type(self).__name__} needs state_dim, hidden and layers >= 1; "
                f"got state_dim={state_dim}, hidden={hidden}, layers={layers}"
            )
        self.state_dim = state_dim
        self.time_input = time_input
        self.residual = residual
        self.rnn = self.rnn_type(
            state_dim + int(time_input), hidden, num_layers=layers, batch_first=True
        )
        self.head = nn.Linear(hidden, state_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _inputs(self, x: Tensor, tau: Tensor) -> Tensor:
        """Return cell inputs ``(B, L, S[+1])`` for fed values ``x (B, L, S)``, ``tau (L,)``."""
        if not self.time_input:
            return x
        return torch.cat((x, tau.expand(x.shape[0], -1).unsqueeze(-1)), -1)

    def _predict(self, out: Tensor, x: Tensor) -> Tensor:
        return x + self.head(out) if self.residual else self.head(out)

    def forward(
        self,
        ys: Tensor,
        *,
        context: int,
        teacher_prob: float = 0.0,
        generator: torch.Generator | None = None,
        horizon: int | None = None,
    ) -> Forecast:
        """Predict ys[:, 1:] from ys ``(B, T, S)``; see the module docstring for feeding.

        With `horizon`, stop `horizon` steps after the context (predictions of
        ys[:, 1 : context + horizon])."""
        if ys.dim() != 3 or ys.shape[-1] != self.state_dim or ys.shape[1] < 2:
            raise UserError(
                f"{type(self).__name__} expects ys (batch, time >= 2, {self.state_dim}); "
                f"got {tuple(ys.shape)}"
            )
        if context < 1 or not 0.0 <= teacher_prob <= 1.0:
            raise UserError(
                f"need context >= 1 and teacher_prob in [0, 1]; got {context}, {teacher_prob}"
            )
        B, T, S = ys.shape
        tau = torch.arange(T, device=ys.device, dtype=ys.dtype) / (T - 1)  # τ_t, (T,)
        L = min(context, T - 1)
        if horizon:
            T = min(T, L + horizon)
        out, state = self.rnn(self._inputs(ys[:, :L], tau[:L]))  # (B, L, H)
        means = [self._predict(out, ys[:, :L])]  # (B, L, S)
        m = means[0][:, -1]
        for t in range(L, T - 1):
            x = feed(ys[:, t], m, teacher_prob, generator)  # (B, S)
            out, state = self.rnn(self._inputs(x.unsqueeze(1), tau[t : t + 1]), state)  # (B, 1, H)
            m = self._predict(out[:, 0], x)
            means.append(m.unsqueeze(1))
        return Forecast(torch.cat(means, 1), None)


class GRUForecaster(_RecurrentForecaster):
    """GRU baseline (the paper's GRU row)."""

    rnn_type = nn.GRU


class LSTMForecaster(_RecurrentForecaster):
    """LSTM baseline (the paper's LSTM row)."""

    rnn_type = nn.LSTM
