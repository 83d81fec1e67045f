"""Root networks: what a prior implements so that WARP can use it as its hidden state.

WARP's hidden state θ_t (batch, n_weights) is the flat weight vector of a root network. A
root family says how many weights it has, what their default values are (θ_0's starting
point), and how to turn per-sample weights into a prediction of the next state:

    mean, std = root(theta, tau, y_prev, dt)    # theta (B, D), tau (B,), y_prev (B, S)

`std` is None unless the root predicts an uncertainty (Gaussian NLL loss). Evaluation is
batched over per-sample weights, never a Python loop over the batch.

A root also says what drives the recurrence θ_t = A θ_{t-1} + B ψ_t: by default the paper's
ψ_t = x_t - x_{t-1} with A and B learned; a physics prior may instead read a window of the
last `input_window` fed values through a nonlinear map (`inputs`) and fix A and B itself
(`recurrence`), so that θ accumulates sums over time of nonlinear features of the data.

Roots live in `priors/`, one file per family, registered with `@register_prior("name")`;
the constructor takes keyword-only options plus `state_dim` and `system` (the registered
`System` of the dataset, or None).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from warp_phys.errors import UserError
from warp_phys.registry import Registry
from warp_phys.system import System


class AbstractRoot(nn.Module, ABC):
    """A family of root networks evaluated with per-sample flat weights."""

    n_weights: int  # D_theta
    # True: the model feeds raw states (physics priors), never standardised
    physical_units: bool = False
    # set by `build_model`: the model standardizes what the root sees (model.normalize and not
    # physical_units), so the root works in units of the training data's standard deviation
    standardized: bool = False
    # consecutive fed values ψ_t sees: x_{t-m+1}..x_t (windows reaching before x_0 repeat x_0
    # and its time, so a prior can tell them by a zero time step)
    input_window: int = 2
    n_inputs: int | None = None  # size of ψ_t; None: the state size (ψ_t = Δx_t)
    # True when `finish_context` does something (a model holding θ then calls it)
    finishes_context: bool = False

    @abstractmethod
    def init_weights(self, generator: torch.Generator | None = None) -> Tensor:
        """Return default flat weights, ``(n_weights,)`` float32."""

    @abstractmethod
    def forward(
        self, theta: Tensor, tau: Tensor, y_prev: Tensor, dt: float
    ) -> tuple[Tensor, Tensor | None]:
        """Predict the next state: mean ``(B, S)`` and std ``(B, S)`` or None."""

    def physical_params(self, theta: Tensor, tau: Tensor, y_prev: Tensor) -> dict[str, Tensor]:
        """Return named physical parameters read from θ, each ``(B,)`` (empty when black-box)."""
        return {}

    def penalty(self, theta: Tensor, tau: Tensor, y_prev: Tensor) -> Tensor:
        """Return a per-sample penalty ``(B,)`` added to the loss with `train.penalty_weight`
        (override it to have one; the base class has none and is never called)."""
        raise NotImplementedError(f"{type(self).__name__} has no penalty")

    def learned_names(self) -> tuple[str, ...] | None:
        """Names of the physical parameters θ estimates (the others are held); None: all."""
        return None

    def inputs(self, tau: Tensor, x: Tensor) -> Tensor:
        """Return ψ ``(..., n_inputs)`` of windows of fed values ``x (..., m, S)`` at
        normalised times ``tau (..., m)``, m = `input_window`. Default: x_t - x_{t-1}."""
        return x[..., -1, :] - x[..., -2, :]

    def check_steps(self, n_steps: int) -> None:
        """Raise UserError if sequences of `n_steps` states cannot be fed (default: any)."""

    def finish_context(self, theta: Tensor) -> Tensor:
        """Return θ to hold through the forecast, from θ ``(B, n_weights)`` at the end of the
        context; called once per forecast by a model that holds θ (`hold_after_context`)
        when `finishes_context` is True. A prior may finish its in-context fit here
        (`priors/lsq.py`). Default: θ unchanged."""
        return theta

    def learnable_init(self) -> Tensor | None:
        """Return a bool mask ``(n_weights,)`` of the entries of θ_0 that training may change
        (the others stay at `init_weights`), or None: every entry is learned."""
        return None

    def recurrence(self) -> tuple[Tensor, Tensor] | None:
        """Return a fixed recurrence (decay ``(n_weights,)`` of a diagonal A, input map B
        ``(n_weights, n_inputs)``) that WARP must use untrained, or None: A and B are learned."""
        return None

    @property
    def default_drive(self) -> bool:
        """True when the recurrence is the paper's: ψ = Δx, A and B learned."""
        return (
            type(self).inputs is AbstractRoot.inputs
            and type(self).recurrence is AbstractRoot.recurrence
            and self.input_window == 2
        )


class FlatMLP:
    """Slice a flat weight vector into the layers of an MLP, ``torch.nn.Linear`` layout.

    Layer by layer: weight (out x in, row-major) then bias, as in the paper's code.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self.shapes = [(o, i) for i, o in zip(self.sizes[:-1], self.sizes[1:], strict=True)]
        self.n_weights = sum(o * i + o for o, i in self.shapes)

    def init(self, generator: torch.Generator | None = None) -> Tensor:
        """Return flat weights with torch.nn.Linear's default init, ``(n_weights,)``."""
        parts = []
        for o, i in self.shapes:
            bound = 1.0 / math.sqrt(i)
            w = (torch.rand(o * i, generator=generator) * 2 - 1) * bound
            b = (torch.rand(o, generator=generator) * 2 - 1) * bound
            parts += [w, b]
        return torch.cat(parts)

    def layers(self, theta: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Split ``theta (B, n_weights)`` into [(W (B, out, in), b (B, out)), ...].

        One `split` (not one slice per piece): its backward assembles the gradient of θ in
        one allocation, where slices would each zero-fill a whole (B, n_weights) tensor."""
        B = theta.shape[0]
        sizes = [n for o, i in self.shapes for n in (o * i, o)]
        parts = torch.split(theta, sizes, dim=1)
        return [
            (parts[2 * n].view(B, o, i), parts[2 * n + 1])  # (B, out, in), (B, out)
            for n, (o, i) in enumerate(self.shapes)
        ]

    def __call__(self, theta: Tensor, x: Tensor, activation=torch.nn.functional.silu) -> Tensor:
        """Evaluate the MLP with per-sample weights: x ``(B, in)`` -> ``(B, out)``."""
        layers = self.layers(theta)
        for n, (w, b) in enumerate(layers):
            x = torch.baddbmm(b.unsqueeze(-1), w, x.unsqueeze(-1)).squeeze(-1)  # (B, out)
            if n < len(layers) - 1:
                x = activation(x)
        return x


PRIORS: Registry[type[AbstractRoot]] = Registry("prior", "warp_phys.priors", "priors/")


def register_prior(name: str):
    """Class decorator: file an `AbstractRoot` subclass in the prior registry under `name`."""
    return PRIORS.register(name)


def build_root(
    name: str, *, state_dim: int, system: System | None = None, **options
) -> AbstractRoot:
    """Instantiate the prior `name` for a dataset of `state_dim` states."""
    cls = PRIORS.get(name)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        valid = [n for n in accepted if n not in ("self", "state_dim", "system")]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise UserError(
                f"unknown option {unknown[0]!r} for prior {name!r}; its options are {', '.join(valid)}"
            )
    return cls(state_dim=state_dim, system=system, **options)


def prior_names() -> list[str]:
    return PRIORS.names()
