"""Lorenz-63, declared symbolically."""

from warp_phys import Box, Param, SymbolicSystem, register_system


@register_system("lorenz63")
class Lorenz63(SymbolicSystem):
    """Lorenz (1963): x' = sigma (y - x), y' = x (rho - z) - y, z' = x y - beta z."""

    state = ("x", "y", "z")
    params = {
        "sigma": Param(10.0, train=(9.0, 11.0), test=(8.0, 12.0)),
        "rho": Param(28.0, train=(26.0, 30.0), test=(24.0, 32.0)),
        "beta": Param(8.0 / 3.0, train=(2.5, 2.9), test=(2.3, 3.1)),
    }
    rhs = ("sigma*(y - x)", "x*(rho - z) - y", "x*y - beta*z")
    y0 = Box(low=(-10.0, -10.0, 15.0), high=(10.0, 10.0, 35.0))
    t_span = (0.0, 10.0)
    n_steps = 1000
    citation = "E. N. Lorenz, Deterministic nonperiodic flow, J. Atmos. Sci. 20 (1963)"
    # largest Lyapunov exponent 0.9056 at sigma = 10, rho = 28, beta = 8/3 (Sprott, Chaos and
    # Time-Series Analysis, 2003)
    lyapunov_time = 1.0 / 0.9056
