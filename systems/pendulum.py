"""Damped pendulum."""

import math

import torch

from warp_phys import Box, Param, System, register_system


@register_system("pendulum")
class DampedPendulum(System):
    """Damped pendulum, theta'' = -(g/L) sin(theta) - b theta'."""

    state = ("theta", "omega")
    units = {"theta": "rad", "omega": "rad/s"}
    params = {
        "g": Param(9.81, unit="m/s^2"),  # fixed: only g/L is identifiable
        "L": Param(1.0, train=(0.5, 2.0), test=(0.3, 3.0), unit="m"),
        "b": Param(0.2, train=(0.05, 0.5), test=(0.02, 0.8), unit="1/s"),
    }
    y0 = Box(low=(-math.pi / 2, -1.0), high=(math.pi / 2, 1.0))
    t_span = (0.0, 10.0)
    n_steps = 256
    equations = ("theta' = omega", "omega' = -(g/L) sin(theta) - b omega")
    identifiable = {"g/L": lambda p: p.g / p.L, "b": lambda p: p.b}

    def vector_field(self, t, y, p):
        theta, omega = y.unbind(-1)
        return torch.stack((omega, -(p.g / p.L) * torch.sin(theta) - p.b * omega), dim=-1)
