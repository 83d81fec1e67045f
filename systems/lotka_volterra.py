"""Lotka-Volterra predator-prey, with the paper's parameter ranges."""

from warp_phys import Fixed, Param, SymbolicSystem, register_system


@register_system("lotka_volterra")
class LotkaVolterra(SymbolicSystem):
    """Lotka-Volterra, x' = a x - b x y, y' = c x y - d y, from x_0 = y_0 = 1 on [0, 1].

    Paper ranges: train a, d ~ U(20, 50), b, c ~ U(80, 120); test a, d ~ U(10, 60),
    b, c ~ U(70, 130).
    """

    state = ("x", "y")
    params = {
        "a": Param(35.0, train=(20.0, 50.0), test=(10.0, 60.0)),
        "b": Param(100.0, train=(80.0, 120.0), test=(70.0, 130.0)),
        "c": Param(100.0, train=(80.0, 120.0), test=(70.0, 130.0)),
        "d": Param(35.0, train=(20.0, 50.0), test=(10.0, 60.0)),
    }
    rhs = ("a*x - b*x*y", "c*x*y - d*y")
    y0 = Fixed(1.0, 1.0)
    t_span = (0.0, 1.0)
    n_steps = 256
    citation = "Nzoyem et al. 2025 (Lotka-Volterra ranges)"
    state_bounds = {"x": (0.0, float("inf")), "y": (0.0, float("inf"))}  # populations
