"""A stored dataset held in memory for training and evaluation (float32 tensors per split)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from warp_phys.config import DataConfig
from warp_phys.errors import UserError
from warp_phys.system import SPLITS, System, get_system

log = logging.getLogger(__name__)


@dataclass
class Split:
    y: Tensor  # (N, T, S) float32
    params: np.ndarray  # (N, P) float64, true parameters


@dataclass
class Dataset:
    path: Path
    system: System
    times: np.ndarray  # (T,)
    state: tuple[str, ...]
    parameter: tuple[str, ...]
    splits: dict[str, Split]

    @property
    def state_dim(self) -> int:
        return len(self.state)

    @property
    def n_steps(self) -> int:
        return len(self.times)

    @property
    def dt(self) -> float:
        return float(self.times[1] - self.times[0])

    def scale(self) -> Tensor:
        """Per-state standard deviation of the training data, ``(S,)`` (loss and input units)."""
        return self.splits["train"].y.std(dim=(0, 1)).clamp_min(1e-6)

    def offset(self) -> Tensor:
        return self.splits["train"].y.mean(dim=(0, 1))


def default_path(cfg: DataConfig) -> Path:
    sizes = f"{cfg.n_train}-{cfg.n_val}-{cfg.n_test}-{cfg.n_test_ood}"
    return Path("runs/out/data") / f"{cfg.system}-{sizes}-s{cfg.seed}.zarr"


def ensure_dataset(cfg: DataConfig, *, progress: bool = True) -> Path:
    """Return the store of `cfg`, generating (or resuming) it when it is not complete."""
    from warp_phys.store import generate_store, is_complete

    path = Path(cfg.path) if cfg.path else default_path(cfg)
    if path.exists() and is_complete(path):
        return path
    if cfg.path and not path.exists() and not cfg.system:
        raise UserError(f"dataset {path} does not exist; give data.system to generate it")
    log.info("generating %s into %s", cfg.system, path)
    counts = {
        "train": cfg.n_train,
        "val": cfg.n_val,
        "test": cfg.n_test,
        "test_ood": cfg.n_test_ood,
    }
    generate_store(
        get_system(cfg.system),
        path,
        counts=counts,
        seed=cfg.seed,
        chunk=cfg.chunk,
        progress=progress,
    )
    return path


def load_dataset(path: Path, splits: tuple[str, ...] = SPLITS) -> Dataset:
    """Load the splits of a store into memory."""
    from warp_phys.store import open_split

    loaded, first = {}, None
    for split in splits:
        ds = open_split(path, split)
        first = first if first is not None else ds
        loaded[split] = Split(
            y=torch.from_numpy(np.asarray(ds["y"].values, dtype=np.float32)),
            params=np.asarray(ds["params"].values, dtype=np.float64),
        )
    system_name = first.attrs["system"]
    try:
        system = get_system(system_name, **_ranges_from_attrs(first.attrs))
    except UserError as err:
        raise UserError(
            f"store {path} was made by system {system_name!r}, which is not available: {err}"
        ) from None
    return Dataset(
        path=Path(path),
        system=system,
        times=np.asarray(first["time"].values, dtype=np.float64),
        state=tuple(str(s) for s in first["state"].values),
        parameter=tuple(str(p) for p in first["parameter"].values),
        splits=loaded,
    )


def _ranges_from_attrs(attrs: dict) -> dict:
    """Rebuild the range overrides a store was generated with, so `in range` checks match it."""
    out = {}
    if isinstance(attrs.get("ranges_train"), dict):
        out["train_ranges"] = {
            k: tuple(v) for k, v in attrs["ranges_train"].items() if v[0] != v[1]
        }
    if isinstance(attrs.get("ranges_test_ood"), dict):
        out["test_ranges"] = {
            k: tuple(v) for k, v in attrs["ranges_test_ood"].items() if v[0] != v[1]
        }
    return out
