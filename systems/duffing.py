"""Forced Duffing oscillator in the double-well regime (chaotic for part of its ranges)."""

from warp_phys import Box, Param, SymbolicSystem, register_system


@register_system("duffing")
class Duffing(SymbolicSystem):
    """Duffing, x'' + delta x' + alpha x + beta x^3 = gamma cos(omega t): damping delta and
    forcing gamma unknown; alpha = -1, beta = 1 (two wells at x = ±1), omega = 1.2 fixed."""

    state = ("x", "v")
    params = {
        "delta": Param(0.3, train=(0.2, 0.4), test=(0.1, 0.5)),
        "alpha": Param(-1.0),
        "beta": Param(1.0),
        "gamma": Param(0.35, train=(0.2, 0.5), test=(0.1, 0.6)),
        "omega": Param(1.2),
    }
    rhs = ("v", "-delta*v - alpha*x - beta*x**3 + gamma*cos(omega*t)")
    y0 = Box(low=(-1.5, -1.0), high=(1.5, 1.0))
    t_span = (0.0, 20.0)
    n_steps = 400
    citation = "G. Duffing, Erzwungene Schwingungen bei veränderlicher Eigenfrequenz (1918)"
