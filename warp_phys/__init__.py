"""warp-phys: WARP and physics-informed WARP for dynamical systems, in PyTorch."""

import gc as _gc

# The cyclic garbage collector is paused while torch and sympy import (tens of thousands of
# new objects, no garbage worth collecting yet: 0.2-0.4 s of every command on 2 cores), then
# left as it was found.
_gc_was_enabled = _gc.isenabled()
_gc.disable()
try:
    from warp_phys.errors import DivergenceError, StoreError, UserError
    from warp_phys.root import AbstractRoot, FlatMLP, build_root, prior_names, register_prior
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
finally:
    if _gc_was_enabled:
        _gc.enable()

__version__ = "0.1.0"

# Heavier modules (store, models) import lazily on first use; simulate and compare are modules:
# `from warp_phys.simulate import simulate`, `from warp_phys.compare import compare`.
_LAZY = {
    "generate_store": "warp_phys.store",
    "open_split": "warp_phys.store",
    "to_xarray": "warp_phys.store",
    "store_info": "warp_phys.store",
    "load_dataset": "warp_phys.data",
    "Dataset": "warp_phys.data",
    "fit": "warp_phys.train",
    "verify_store": "warp_phys.integrity",
    "fingerprint": "warp_phys.integrity",
    "WARP": "warp_phys.warp",
    "Forecast": "warp_phys.forecaster",
    "AbstractForecaster": "warp_phys.forecaster",
    "GRUForecaster": "warp_phys.baselines",
    "LSTMForecaster": "warp_phys.baselines",
    "load_config": "warp_phys.config",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'warp_phys' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "AbstractRoot",
    "FlatMLP",
    "build_root",
    "prior_names",
    "register_prior",
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
