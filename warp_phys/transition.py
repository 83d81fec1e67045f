"""Transitions A of the weight-space recurrence θ_t = A θ_{t-1} + B Δx_t.

Each transition is a module with learnable parameters that builds, once per forward pass,
the linear operator the scan and the step loop share (`warp_phys.scan.DenseOp` or
`BlockDiagOp`), optionally padded to a larger state size: padded coordinates get a zero
row and column (dense) or a zero diagonal entry, so a state that starts at zero there stays
at zero and never touches the real coordinates.

- ``dense``: the paper's A, identity init, stored as I + Ã with Ã zero-init so that only
  the small deviation is ever multiplied (reduced-precision products keep it).
- ``diagonal``: A = diag(1 + ã), ã zero-init: Dθ parameters, so the root can grow past the
  dense limit (Dθ² parameters).
- ``prior``: a fixed diagonal A given by the root (`AbstractRoot.recurrence`), not trained.
- ``rotation``: block-diagonal damped 2x2 rotations, i.e. a complex diagonal
  λ = exp(-exp(ν)) e^{iω}, modulus <= 1 for every ν (stable by construction). Memory init:
  every other block at the identity, the others with frequencies spread geometrically over
  `freq_range` (radians per step) and moduli spread over `modulus_range`, slow rotations
  paired with long memory. An odd leftover coordinate gets a real damped entry exp(-exp(ν)).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from warp_phys.errors import UserError
from warp_phys.scan import BlockDiagOp, DenseOp, LinearOp

# ν of a block "at the identity": exp(-exp(-20)) = 1 - 2e-9 rounds to exactly 1.0 in float32,
# while ν stays finite, so an optimiser (Adam moves ν at the learning rate) can still move it.
IDENTITY_NU = -20.0


class AbstractTransition(nn.Module, ABC):
    """A learnable linear map A on R^dim."""

    dim: int

    @abstractmethod
    def operator(self, dim: int | None = None) -> LinearOp:
        """Return A as a scan operator, padded to `dim` >= self.dim coordinates."""

    def apply(self, h: Tensor) -> Tensor:
        """Return A h for h ``(..., D)`` (D may exceed `dim`: padding)."""
        return self.operator(h.shape[-1]).apply(h)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _pad(self, dim: int | None) -> int:
        dim = self.dim if dim is None else dim
        if dim < self.dim:
            raise ValueError(f"cannot pad a {self.dim}-dim transition to {dim} coordinates")
        return dim - self.dim


class Dense(AbstractTransition):
    """A = I + Ã, Ã ``(D, D)`` zero-init (the paper's identity init, residual storage)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.residual = nn.Parameter(torch.zeros(dim, dim))

    def operator(self, dim: int | None = None) -> DenseOp:
        p = self._pad(dim)
        return DenseOp(F.pad(self.residual, (0, p, 0, p)) if p else self.residual)

    def matrix(self) -> Tensor:
        """Return A as a plain ``(D, D)`` matrix."""
        return (
            torch.eye(self.dim, dtype=self.residual.dtype, device=self.residual.device)
            + self.residual
        )


class Diagonal(AbstractTransition):
    """A = diag(1 + ã), ã ``(D,)`` zero-init."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.residual = nn.Parameter(torch.zeros(dim))

    def operator(self, dim: int | None = None) -> BlockDiagOp:
        empty = self.residual[:0]
        return BlockDiagOp(empty, empty, F.pad(1.0 + self.residual, (0, self._pad(dim))))


class Rotation(AbstractTransition):
    """Block-diagonal damped rotations, λ_k = exp(-exp(ν_k)) e^{iω_k}, plus a damped tail."""

    def __init__(
        self,
        dim: int,
        *,
        freq_range: tuple[float, float] = (1e-2, math.pi / 2),
        modulus_range: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        lo_f, hi_f = freq_range
        lo_r, hi_r = modulus_range
        if not (0 < lo_f <= hi_f and 0 < lo_r <= hi_r < 1):
            raise UserError(
                f"rotation needs 0 < freq_range[0] <= freq_range[1] and 0 < modulus_range[0] <= "
                f"modulus_range[1] < 1; got freq_range={freq_range}, modulus_range={modulus_range}"
            )
        self.dim = dim
        P = dim // 2
        nu = torch.full((P,), IDENTITY_NU)
        omega = torch.zeros(P)
        mem = torch.arange(1, P, 2)  # every other block carries memory, the rest is identity
        n = len(mem)
        if n:
            omega[mem] = torch.logspace(math.log10(lo_f), math.log10(hi_f), n)
            modulus = torch.linspace(hi_r, lo_r, n)  # slowest rotation, longest memory
            nu[mem] = torch.log(-torch.log(modulus))
        self.nu = nn.Parameter(nu)  # (P,) log decay rate
        self.omega = nn.Parameter(omega)  # (P,) radians per step
        # odd dim: the leftover coordinate is a real damped entry, at the identity too
        self.nu_tail = nn.Parameter(torch.full((1,), IDENTITY_NU)) if dim % 2 else None

    def eigenvalues(self) -> Tensor:
        """Return the complex eigenvalues λ ``(P,)`` of the rotation blocks."""
        r = torch.exp(-torch.exp(self.nu))
        return torch.polar(r, self.omega)

    def operator(self, dim: int | None = None) -> BlockDiagOp:
        r = torch.exp(-torch.exp(self.nu))
        c = self.nu[:0] if self.nu_tail is None else torch.exp(-torch.exp(self.nu_tail))
        return BlockDiagOp(
            r * torch.cos(self.omega), r * torch.sin(self.omega), F.pad(c, (0, self._pad(dim)))
        )


class FixedDiagonal(AbstractTransition):
    """A = diag(decay), given and never trained: the recurrence a prior fixes itself
    (`AbstractRoot.recurrence`), e.g. 1 for running sums and λ < 1 for exponential filters."""

    def __init__(self, dim: int, *, decay: Tensor) -> None:
        super().__init__()
        if decay.shape != (dim,):
            raise ValueError(f"decay must have shape ({dim},); got {tuple(decay.shape)}")
        self.dim = dim
        self.register_buffer("decay", decay.detach().clone().float())

    def operator(self, dim: int | None = None) -> BlockDiagOp:
        empty = self.decay[:0]
        return BlockDiagOp(empty, empty, F.pad(self.decay, (0, self._pad(dim))))


TRANSITIONS: dict[str, type[AbstractTransition]] = {
    "dense": Dense,
    "diagonal": Diagonal,
    "rotation": Rotation,
    "prior": FixedDiagonal,  # the prior's own fixed recurrence (AbstractRoot.recurrence)
}


def build_transition(name: str, dim: int, **options) -> AbstractTransition:
    """Instantiate the transition `name` on R^dim."""
    if name not in TRANSITIONS:
        raise UserError(f"unknown transition {name!r}; choose one of {', '.join(TRANSITIONS)}")
    return TRANSITIONS[name](dim, **options)
