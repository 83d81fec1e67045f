"""Systems whose vector field is numpy code: data generation only.

    class Wrapped(NumpySystem):
        untraced = "why this field is not torch code"
        def numpy_field(self, t, y, params):   # t (N,), y (N, S), params (N, P) -> (N, S)
            ...

The integrator calls `numpy_field` through `vector_field` (tensors in, tensors out, no
gradient). The physics priors and ``ode_fit`` need a field they can differentiate and
integrate inside a model, so `check_differentiable` refuses them with the reason.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from torch import Tensor

from warp_phys.errors import UserError
from warp_phys.system import ParamView, System


class NumpySystem(System):
    """A `System` whose vector field is a numpy function (see module doc)."""

    untraced: str = ""  # why the field is numpy code (shown in refusals)

    @abstractmethod
    def numpy_field(self, t: np.ndarray, y: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Return dy/dt ``(N, S)`` for ``t (N,)``, ``y (N, S)``, ``params (N, P)`` (float64)."""

    def vector_field(self, t: Tensor, y: Tensor, p: ParamView) -> Tensor:
        S, P = y.shape[-1], len(self.params)
        yn = y.detach().reshape(-1, S).cpu().numpy()  # (N, S)
        pn = torch.broadcast_to(p.values.detach(), (*y.shape[:-1], P)).reshape(-1, P).cpu()
        tn = torch.broadcast_to(torch.as_tensor(t).detach(), y.shape[:-1]).reshape(-1).cpu()
        out = self.numpy_field(tn.numpy(), yn, pn.numpy())  # (N, S)
        return torch.as_tensor(out, dtype=y.dtype, device=y.device).reshape(y.shape)

    def jacobian(self, t: Tensor, y: Tensor, p: ParamView) -> Tensor:
        self.check_differentiable("the Jacobian")
        raise AssertionError("unreachable")

    def check_differentiable(self, user: str) -> None:
        raise UserError(
            f"{user} does not apply to system {self.name!r}: its right-hand side is numpy code "
            f"({self.untraced}), and physics priors and ode_fit need a torch vector field; use "
            f"the blackbox prior or GRU/LSTM"
        )
