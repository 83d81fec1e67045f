"""Shared fixtures: test-only systems and helpers to read stores back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from warp_phys import Fixed, Param, System
from warp_phys.system import SPLITS

COUNTS = {"train": 10, "val": 2, "test": 2, "test_ood": 3}  # small, uneven: last chunks are partial


class WrongShape(System):
    """Declares two states but its vector field returns one component."""

    state = ("x", "v")
    params = {"k": Param(1.0, train=(0.5, 1.5))}
    y0 = Fixed(1.0, 0.0)
    t_span = (0.0, 1.0)
    n_steps = 8

    def vector_field(self, t, y, p):
        return y[..., :1]


class BlowUp(System):
    """x' = a x^2 from x(0) = 1 blows up at t = 1/a: finite on t in [0, 1] for a < 1 (train),
    not for a in [2, 3] (test_ood)."""

    state = ("x",)
    params = {"a": Param(0.5, train=(0.2, 0.4), test=(2.0, 3.0))}
    y0 = Fixed(1.0)
    t_span = (0.0, 1.0)
    n_steps = 8

    def vector_field(self, t, y, p):
        return p.a.unsqueeze(-1) * y**2


@pytest.fixture
def counts():
    """Small, uneven split sizes: the last chunk of a split is usually partial."""
    return dict(COUNTS)


@pytest.fixture
def test_systems():
    """Register WrongShape and BlowUp for one test only.

    Registry-parametrised tests elsewhere must never see these broken systems.
    """
    from warp_phys.system import SYSTEMS, register_system, system_names

    system_names()  # load the built-ins first
    names = {"test_store_wrong_shape": WrongShape, "test_store_blow_up": BlowUp}
    for name, cls in names.items():
        register_system(name)(cls)
    yield {name: cls() for name, cls in names.items()}
    for name in names:
        SYSTEMS.unregister(name)


class _ModelData:
    """What `build_model` reads of a dataset, for `state_dim` standardized states: no store."""

    dt, system = 0.1, None

    def __init__(self, state_dim: int) -> None:
        self.state_dim = state_dim

    def offset(self):
        return torch.zeros(self.state_dim)

    def scale(self):
        return torch.ones(self.state_dim)


@pytest.fixture
def model_data():
    """Return ``make(state_dim)``: a stand-in dataset for `build_model`."""
    return _ModelData


@pytest.fixture
def read_store():
    """Return `read_arrays`, for tests (helpers are handed out as fixtures, not imported)."""
    return read_arrays


@pytest.fixture
def same_arrays():
    """Return `assert_same_arrays`."""
    return assert_same_arrays


def read_arrays(path) -> dict[tuple[str, str], np.ndarray]:
    """Return every split's y, params and y0 as numpy arrays, keyed by (split, variable)."""
    from warp_phys.store import open_split

    out = {}
    for split in SPLITS:
        ds = open_split(path, split)
        for var in ("y", "params", "y0"):
            out[split, var] = ds[var].values
    return out


def assert_same_arrays(a: dict, b: dict) -> None:
    """Same keys, shapes, dtypes and bytes (so -0.0 vs 0.0 or a NaN would count as different)."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"


MSD_SEED, MSD_CHUNK = 5, 3


@pytest.fixture(scope="session")
def msd_store(tmp_path_factory):
    """A complete msd store (seed 5, chunk 3), shared read-only: copy it to modify it."""
    from warp_phys.store import generate_store
    from warp_phys.system import get_system

    path = tmp_path_factory.mktemp("stores") / "msd.zarr"
    generate_store(
        get_system("msd"), path, counts=COUNTS, seed=MSD_SEED, chunk=MSD_CHUNK, progress=False
    )
    return path
