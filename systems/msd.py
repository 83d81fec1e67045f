"""The paper's mass-spring-damper (MSD) and MSD-Zero (Nzoyem et al. 2025, sec. 4)."""

import torch

from warp_phys import Box, Fixed, Param, System, register_system


@register_system("msd")
class MassSpringDamper(System):
    """Mass-spring-damper, m x'' + c x' + k x = 0, from x_0 = (1, 0) on t in [0, 1].

    Ranges as in the paper: train m ~ U(0.02, 0.04), k ~ U(4, 16), c ~ U(0.01, 0.2);
    out-of-distribution test m ~ U(0.01, 0.05), k ~ U(2, 18), c ~ U(0.01, 0.3).
    """

    state = ("x", "v")
    units = {"x": "m", "v": "m/s"}
    params = {
        "m": Param(0.03, train=(0.02, 0.04), test=(0.01, 0.05), unit="kg"),
        "k": Param(10.0, train=(4.0, 16.0), test=(2.0, 18.0), unit="N/m"),
        "c": Param(0.1, train=(0.01, 0.2), test=(0.01, 0.3), unit="N s/m"),
    }
    y0 = Fixed(1.0, 0.0)
    t_span = (0.0, 1.0)
    n_steps = 256
    equations = ("x' = v", "v' = -(k x + c v) / m")
    citation = "Nzoyem et al. 2025, Weight-Space Linear Recurrent Neural Networks (MSD)"
    # the trajectories depend on k/m and c/m only
    identifiable = {"k/m": lambda p: p.k / p.m, "c/m": lambda p: p.c / p.m}

    def vector_field(self, t, y, p):
        x, v = y.unbind(-1)
        return torch.stack((v, -(p.k * x + p.c * v) / p.m), dim=-1)


@register_system("msd_zero")
class MassSpringDamperZero(System):
    """The paper's MSD-Zero: MSD with x_0 = (1, 0) + U(-0.5, 0.5)^2."""

    state = MassSpringDamper.state
    units = MassSpringDamper.units
    params = MassSpringDamper.params
    y0 = Box(low=(0.5, -0.5), high=(1.5, 0.5))
    t_span = (0.0, 1.0)
    n_steps = 256
    equations = MassSpringDamper.equations
    citation = "Nzoyem et al. 2025, Weight-Space Linear Recurrent Neural Networks (MSD-Zero)"
    identifiable = MassSpringDamper.identifiable

    def vector_field(self, t, y, p):
        x, v = y.unbind(-1)
        return torch.stack((v, -(p.k * x + p.c * v) / p.m), dim=-1)
