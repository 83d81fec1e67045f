"""One training run on disk: resolved config, checkpoints, metrics.json, predictions.

runs/out/<name>/<label>/
    config.toml  run.json  best.pt  last.pt  history.json  loss.png
    train_summary.json  metrics.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr

from warp_phys.config import ModelConfig, RunConfig, load_config, to_toml
from warp_phys.data import Dataset, ensure_dataset, load_dataset
from warp_phys.errors import UserError
from warp_phys.evaluate import evaluate_split
from warp_phys.models import build_model
from warp_phys.train import load_checkpoint, load_weights, resolve_device, train

log = logging.getLogger(__name__)
EVAL_SPLITS = ("test", "test_ood")


def prepare_data(cfg: RunConfig, *, progress: bool = True) -> Dataset:
    """Generate the dataset of `cfg` when missing, then load it into memory."""
    return load_dataset(ensure_dataset(cfg.data, progress=progress))


def train_and_evaluate(
    cfg: RunConfig,
    data: Dataset,
    label: str,
    model_cfg: ModelConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train `model_cfg` on `data` in `run_dir`, evaluate the best checkpoint, write metrics.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    meta = {"label": label, "model": dataclasses.asdict(model_cfg), "data_path": str(data.path)}
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2))
    summary = train(cfg, data, run_dir, model_cfg=model_cfg, resume=resume, progress=progress)
    if not math.isfinite(summary["best_val"]):
        reason = summary["stopped"] or "every validation forecast was non-finite"
        failed = (
            f"never produced a finite validation score ({reason}); not evaluated at its "
            f"untrained weights"
        )
        (run_dir / "metrics.json").write_text(json.dumps({"label": label, "failed": failed}))
        return {"failed": failed, "train": summary, "predictions": {}}
    return evaluate_run(run_dir, cfg=cfg, data=data) | {"train": summary}


def load_run(run_dir: Path, data: Dataset | None = None):
    """Return (config, label, model config, dataset, model loaded from best.pt) of a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "config.toml").is_file():
        raise UserError(
            f"{run_dir} is not a run directory (no run.json/config.toml); give the folder `train` wrote"
        )
    cfg = load_config(str(run_dir / "config.toml"))
    meta = json.loads((run_dir / "run.json").read_text())
    model_cfg = ModelConfig(**meta["model"])
    data = data or load_dataset(Path(meta["data_path"]))
    model = build_model(model_cfg, data)
    load_weights(model, load_checkpoint(run_dir / "best.pt")["model"], run_dir / "best.pt")
    return cfg, meta["label"], model_cfg, data, model


def evaluate_run(
    run_dir: Path,
    *,
    cfg: RunConfig | None = None,
    data: Dataset | None = None,
    device: str | None = None,
) -> dict:
    """Evaluate a run's best checkpoint on test and test_ood; write metrics.json; return results."""
    loaded_cfg, label, _, data, model = load_run(run_dir, data)
    cfg = cfg or loaded_cfg
    dev = resolve_device(cfg.train, device)
    model.to(dev)
    L = cfg.data.context
    results, preds = {}, {}
    for split in EVAL_SPLITS:
        out = evaluate_split(model, data, split, L, device=dev)
        results[split] = out["metrics"]
        preds[split] = (out["mean"], out["std"])
    n_params = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    metrics = {"label": label, "context": L, "n_params": n_params, "splits": results}
    (Path(run_dir) / "metrics.json").write_text(json.dumps(_finite(metrics)))
    return {"metrics": metrics, "predictions": preds}


def predictions_dataset(
    data: Dataset,
    split: str,
    context: int,
    preds: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
) -> xr.Dataset:
    """Truth beside each model's predictions: dims (model, trajectory, time, state).

    `truth` is the clean trajectory, `observation` what the models saw (noisy with noise).
    `prediction[t]` for t < L is the one-step prediction under teacher forcing, for t >= L the
    forecast; t = 0 has none (NaN). `std` is present (NaN elsewhere) for models predicting it.
    """
    truth = data.splits[split].truth.numpy()
    N, T, S = truth.shape
    labels = list(preds)
    pred = np.full((len(labels), N, T, S), np.nan, np.float32)
    std = np.full_like(pred, np.nan)
    for i, lab in enumerate(labels):
        mean, sd = preds[lab]
        pred[i, :, 1:] = mean.numpy()
        if sd is not None:
            std[i, :, 1:] = sd.numpy()
    coords = {
        "model": _strings(labels),
        "trajectory": np.arange(N),
        "time": data.times,
        "state": _strings(data.state),
        "parameter": _strings(data.parameter),
    }
    ds = xr.Dataset(
        {
            "truth": (("trajectory", "time", "state"), truth),
            "prediction": (("model", "trajectory", "time", "state"), pred),
            "std": (("model", "trajectory", "time", "state"), std),
            "params": (("trajectory", "parameter"), data.splits[split].params),
            # what models saw: the noisy observations (the truth itself without noise)
            "observation": (("trajectory", "time", "state"), data.splits[split].y.numpy()),
            "is_forecast": (("time",), np.arange(T) >= context),
        },
        coords=coords,
        attrs={
            "split": split,
            "context": context,
            "system": data.system.name,
            "noise": data.noise,
        },
    )
    return ds


def write_predictions(path: Path, datasets: dict[str, xr.Dataset]) -> None:
    """Write one zarr group per split (open with xarray.open_zarr(path, group=split))."""
    for split, ds in datasets.items():
        ds.to_zarr(path, group=split, mode="w", zarr_format=3, consolidated=False)
    # zarr warns that consolidated metadata is not in the v3 spec yet
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(path)


def _strings(xs) -> np.ndarray:
    """Names as an object array: zarr v3 stores them as variable-length strings."""
    return np.array(list(xs), dtype=object)


def _finite(obj):
    """JSON has no NaN/inf: write them as strings so the file stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
