"""The paper's sine task: x(t) = sin(2 pi t + phase), 16 steps on [0, 1]."""

import math

import numpy as np
import torch

from warp_phys import Fixed, Param, System, register_system


@register_system("sine")
class Sine(System):
    """x' = 2 pi cos(2 pi t + phase), x(0) = sin(phase), so x = sin(2 pi t + phase)."""

    state = ("x",)
    params = {
        "phase": Param(0.0, train=(-math.pi / 6, math.pi / 6), test=(-math.pi / 3, math.pi / 3)),
    }
    y0 = Fixed(0.0)  # replaced by sin(phase) in initial_state
    t_span = (0.0, 1.0)
    n_steps = 16
    equations = ("x' = 2 pi cos(2 pi t + phase)", "x(0) = sin(phase)")
    citation = "Nzoyem et al. 2025 (sine data-efficiency task)"

    def initial_state(self, y0, params):
        return np.sin(params[:, :1])  # (n, 1)

    def vector_field(self, t, y, p):
        return (2 * math.pi * torch.cos(2 * math.pi * t + p.phase)).unsqueeze(-1)
