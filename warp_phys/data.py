"""A stored dataset held in memory for training and evaluation (float32 tensors per split)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
    """One split in memory. Models and references see `y`; errors are taken against `truth`.

    Without observation noise both are the same tensor; with it `y` holds the noisy
    observations and `truth` the clean trajectories.
    """

    y: Tensor  # (N, T, S) float32, what is observed
    params: np.ndarray  # (N, P) float64, true parameters
    truth: Tensor | None = None  # (N, T, S) float32 clean trajectories; None: the same as y

    def __post_init__(self) -> None:
        if self.truth is None:
            self.truth = self.y


@dataclass
class Dataset:
    path: Path
    system: System
    times: np.ndarray  # (T,)
    state: tuple[str, ...]
    parameter: tuple[str, ...]
    splits: dict[str, Split]
    noise: float = 0.0  # observation noise, fraction of each state's train std (0: clean)
    cache: dict = field(default_factory=dict, repr=False)  # results shared by every model

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
    noise = f"-n{cfg.noise:g}" if cfg.noise else ""
    return Path("runs/out/data") / f"{cfg.system}-{sizes}-s{cfg.seed}{noise}.zarr"


def ensure_dataset(cfg: DataConfig, *, progress: bool = True) -> Path:
    """Return the store of `cfg`, generating (or resuming) it when it is not complete."""
    from warp_phys.store import generate_store, is_complete

    path = Path(cfg.path) if cfg.path else default_path(cfg)
    if path.exists() and is_complete(path):
        check_store_noise(path, cfg.noise)
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
        noise=cfg.noise,
        progress=progress,
    )
    return path


def check_store_noise(path: Path, noise: float) -> None:
    """Raise when data.noise asks for observation noise that the store at `path` does not have.

    data.noise = 0 asks for nothing: a store's own noise (or none) is then used as it is."""
    from warp_phys.store import store_info

    have = store_info(path)["noise"]
    if noise and have != noise:
        what = f"with noise {have:g}" if have else "without observation noise"
        raise UserError(
            f"data.noise = {noise:g} was asked but the store {path} was generated {what}; "
            f"generate one with `warp-phys generate SYSTEM --noise {noise:g} --out NEW.zarr` "
            f"and pass it with --data, or drop data.noise"
        )


def load_dataset(path: Path, splits: tuple[str, ...] = SPLITS) -> Dataset:
    """Load the splits of a store into memory."""
    from warp_phys.store import open_split

    loaded, first = {}, None
    for split in splits:
        ds = open_split(path, split)
        first = first if first is not None else ds
        clean = torch.from_numpy(np.asarray(ds["y"].values, dtype=np.float32))
        obs = ds.get("obs")
        loaded[split] = Split(
            y=clean if obs is None else torch.from_numpy(np.asarray(obs.values, dtype=np.float32)),
            params=np.asarray(ds["params"].values, dtype=np.float64),
            truth=clean,
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
        noise=float(first.attrs.get("noise", 0.0)),
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
