"""A stored dataset held in memory for training and evaluation (float32 tensors per split)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from warp_phys import location
from warp_phys.config import DataConfig
from warp_phys.errors import UserError
from warp_phys.location import RemotePath
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
    path: Path | RemotePath  # a local folder or an fsspec URL (`location.py`)
    system: System
    times: np.ndarray  # (T,)
    state: tuple[str, ...]
    parameter: tuple[str, ...]
    splits: dict[str, Split]
    noise: float = 0.0  # observation noise, fraction of each state's train std (0: clean)
    fingerprint: str = ""  # content identity of the store (`integrity.fingerprint`)
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

    def loader(
        self, split: str, *, batch_size: int = 64, shuffle: bool = True, seed: int = 0
    ) -> torch.utils.data.DataLoader:
        """A torch DataLoader over one split: batches of dicts with ``y`` (what is observed,
        ``(B, T, S)``), ``truth`` (clean) and ``params (B, P)``."""
        if split not in self.splits:
            raise UserError(f"no split {split!r} loaded; splits: {', '.join(self.splits)}")
        sp = self.splits[split]
        items = torch.utils.data.StackDataset(
            y=sp.y, truth=sp.truth, params=torch.from_numpy(sp.params)
        )
        return torch.utils.data.DataLoader(
            items, batch_size=batch_size, shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    def offset(self) -> Tensor:
        return self.splits["train"].y.mean(dim=(0, 1))


def default_path(cfg: DataConfig, out_dir: str | Path = "runs/out") -> Path:
    """Where the dataset of a preset without `data.path` is generated: under out_dir/data/."""
    sizes = f"{cfg.n_train}-{cfg.n_val}-{cfg.n_test}-{cfg.n_test_ood}"
    noise = f"-n{cfg.noise:g}" if cfg.noise else ""
    system = cfg.system.replace(":", "_")  # dysts:Lorenz: no colon in a path
    return Path(out_dir) / "data" / f"{system}-{sizes}-s{cfg.seed}{noise}.zarr"


def ensure_dataset(
    cfg: DataConfig, *, out_dir: str | Path = "runs/out", progress: bool = True
) -> Path | RemotePath:
    """Return the store of `cfg`: `data.path`, which must exist, or else the preset's dataset
    under out_dir/data/, generated (or resumed) when it is not complete.

    A `data.path` is never generated: a mistyped path would otherwise silently become a new
    default dataset. Stores are made by `warp-phys generate` or by a preset naming its system.
    """
    from warp_phys.store import generate_store, is_complete

    if cfg.path:
        path = location.parse(cfg.path)
        if not path.exists():
            raise UserError(
                f"no store at {path} (data.path / --data): check the path, or create it with "
                f"`warp-phys generate {cfg.system or 'SYSTEM'} --out {path}`"
            )
        check_store_noise(path, cfg.noise)
        return path
    path = default_path(cfg, out_dir)
    if path.exists() and is_complete(path):
        check_store_noise(path, cfg.noise)
        return path
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


def check_store_noise(path, noise: float) -> None:
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


def load_dataset(path, splits: tuple[str, ...] = SPLITS, *, system: str = "") -> Dataset:
    """Load the splits of a store into memory, checking what is loaded.

    Args:
        path: a complete store made by `generate`: a folder or an fsspec URL.
        splits: the splits to load.
        system: the system the caller expects ("" = the store's own); another is an error.

    Raises:
        StoreError: the store is incomplete, damaged, relabelled, or holds values that are not
            finite, outside their recorded range, or parameters outside their declared ranges.
        UserError: the store holds another system than `system`.
    """
    from warp_phys.integrity import check_rows, fingerprint, reading, store_system
    from warp_phys.store import _open_complete, _splits, open_split

    path = location.parse(path)
    root = _open_complete(path)
    made_by = store_system(path, root, _splits(root))
    if system and system != made_by.name:
        raise UserError(
            f"data.system is {system!r} but the store {path} holds {made_by.name!r} "
            f"trajectories; give a {system!r} store, or set data.system to {made_by.name!r} "
            f"(or leave it out with --data)"
        )
    loaded, first = {}, None
    for split in splits:
        ds = open_split(path, split)
        first = first if first is not None else ds
        with reading(path, f"split {split}"):
            present = [v for v in ("y", "obs", "params", "y0") if v in ds]
            rows = {v: np.asarray(ds[v].values, dtype=np.float64) for v in present}
        check_rows(path, split, rows, 0, dict(root[split].attrs), made_by)
        clean = torch.from_numpy(rows["y"].astype(np.float32))
        obs = rows.get("obs")
        loaded[split] = Split(
            y=clean if obs is None else torch.from_numpy(obs.astype(np.float32)),
            params=rows["params"],
            truth=clean,
        )
    return Dataset(
        path=path,
        system=made_by,
        times=np.asarray(first["time"].values, dtype=np.float64),
        state=tuple(str(s) for s in first["state"].values),
        parameter=tuple(str(p) for p in first["parameter"].values),
        splits=loaded,
        noise=float(first.attrs.get("noise", 0.0)),
        fingerprint=fingerprint(path),
    )
