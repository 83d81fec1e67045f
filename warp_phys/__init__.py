"""warp-phys: WARP and physics-informed WARP for dynamical systems, in PyTorch."""

from warp_phys.errors import DivergenceError, StoreError, UserError
from warp_phys.symbolic import SymbolicSystem
from warp_phys.system import (
    SPLITS,
    Box,
    Fixed,
    Param,
    ParamView,
    System,
    get_system,
    register_system,
    system_names,
)

__version__ = "0.1.0"

__all__ = [
    "SPLITS",
    "Box",
    "DivergenceError",
    "Fixed",
    "Param",
    "ParamView",
    "StoreError",
    "SymbolicSystem",
    "System",
    "UserError",
    "__version__",
    "get_system",
    "register_system",
    "system_names",
]
