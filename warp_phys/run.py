"""One training run on disk: its record, resolved config, checkpoints, metrics, predictions.

runs/out/<name>/<label>/
    run.json     the record: the settings that fix the training (context, model, recipe),
                 the data (absolute path and content fingerprint of the store), the state
                 (training | finished | failed) and a run id
    config.toml  the resolved config
    best.pt  last.pt  history.json  loss.png  train_summary.json  metrics.json  predictions.zarr

What a run directory promises:
- nothing is written into it before the command's inputs are checked (config, data, model,
  the checkpoint to resume from): a failing command leaves an earlier run as it was;
- a directory holding a run is continued only with ``resume=True`` and the same settings and
  data (a difference is one error naming it), and replaced only with ``overwrite=True``; a
  folder that holds something other than a run is never written into;
- metrics.json names the run id it evaluates, and a run still training is evaluated only when
  asked (``allow_unfinished``), with its metrics marked unfinished.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import sys
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr

from warp_phys.atomic import json_safe, write_json_atomic, write_text_atomic
from warp_phys.config import ModelConfig, RunConfig, load_config, model_config, to_toml
from warp_phys.data import Dataset, ensure_dataset, load_dataset
from warp_phys.errors import UserError
from warp_phys.evaluate import evaluate_split
from warp_phys.models import build_model
from warp_phys.train import load_checkpoint, load_weights, resolve_device, torch_threads, train

log = logging.getLogger(__name__)
EVAL_SPLITS = ("test", "test_ood")
RUN_FORMAT = 2  # version of run.json (1: no state, data fingerprint or settings recorded)
STATES = ("training", "finished", "failed")
# what a run writes: removed by overwrite=True, nothing else in the folder is touched
RUN_FILES = (
    "run.json", "config.toml", "best.pt", "last.pt", "history.json", "loss.png",
    "train_summary.json", "metrics.json", "predictions.zarr",
)  # fmt: skip


def show_bars(progress: bool | None) -> bool:
    """Progress bars: as asked, or (None) only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress


def prepare_data(cfg: RunConfig, *, progress: bool = True) -> Dataset:
    """Generate the dataset of `cfg` when missing, then load it into memory; the context must
    be long enough to fit the system's unknowns (the ode_fit reference, WARP-Phys)."""
    data = _load_data(cfg, progress=progress)
    from warp_phys.identify import check_fit_context

    check_fit_context(data.system, cfg.data.context)
    return data


def _load_data(cfg: RunConfig, *, progress: bool = True) -> Dataset:
    """Load the store of `cfg` (generating the preset's dataset when it names no path)."""
    path = ensure_dataset(cfg.data, out_dir=cfg.out_dir, progress=progress)
    return load_dataset(path, system=cfg.data.system)


def run_settings(cfg: RunConfig, model_cfg: ModelConfig) -> dict:
    """What fixes a model's training besides its data: the context, the model and its recipe."""
    recipe = dataclasses.asdict(cfg.train_for(model_cfg))
    recipe.pop("threads")  # a machine resource, not a setting: the results do not depend on it
    settings = {
        "context": cfg.data.context,
        "model": dataclasses.asdict(model_cfg),
        "train": recipe,
    }
    return json.loads(json.dumps(settings))  # tuples -> lists, as run.json gives them back


def data_record(data: Dataset) -> dict:
    return {
        "path": str(Path(data.path).resolve()),
        "fingerprint": data.fingerprint,
        "system": data.system.name,
    }


def plan_run(
    run_dir: Path,
    cfg: RunConfig,
    model_cfg: ModelConfig,
    data: Dataset,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> tuple[str, dict | None]:
    """Decide what to do with `run_dir`, writing nothing: return (action, its record).

    Actions: "new" (nothing there), "done" (a finished or failed run with the same settings
    and data: reported, not trained again), "continue" (resume=True and an unfinished run with
    the same settings and data), "replace" (overwrite=True and a run there).

    Raises:
        UserError: resume with nothing to resume, or with other settings or data (naming the
            first difference); a run there with other settings, or unfinished, without resume
            or overwrite; a folder holding something other than a run.
    """
    run_dir = Path(run_dir)
    record = _existing_run(run_dir, lenient=overwrite and not resume)
    if record is None:
        if resume:
            raise UserError(
                f"nothing to resume in {run_dir} (no run.json); run without --resume to start "
                f"afresh"
            )
        return "new", None
    if overwrite and not resume:
        return "replace", record
    settings, data_rec = run_settings(cfg, model_cfg), data_record(data)
    if resume:
        _check_same(run_dir, record, settings, data_rec)
        return ("continue" if record["state"] == "training" else "done"), record
    same = record["data"]["fingerprint"] == data_rec["fingerprint"] and not _difference(
        record["settings"], settings
    )
    if same and record["state"] != "training":
        return "done", record
    if same:
        why = "an unfinished run"
    else:
        why = f"a {record['state']} run with other {_what_differs(record, settings, data_rec)}"
    raise UserError(
        f"{run_dir} already holds {why}; continue it with --resume, replace it with "
        f"--overwrite, or choose another --out"
    )


def _what_differs(record: dict, settings: dict, data_rec: dict) -> str:
    if record["data"]["fingerprint"] != data_rec["fingerprint"]:
        return f"data (store {record['data']['path']})"
    return f"settings ({_difference(record['settings'], settings)})"


def train_and_evaluate(
    cfg: RunConfig,
    data: Dataset,
    label: str,
    model_cfg: ModelConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict:
    """Train `model_cfg` on `data` in `run_dir`, evaluate the best checkpoint, write metrics.json.

    What happens to a run already in `run_dir` is `plan_run`'s decision: a finished one with
    the same settings and data is evaluated again and reported (``"reused": True``) instead of
    trained again.

    Args:
        resume: continue the run in `run_dir` (it must hold one with the same settings and
            data).
        overwrite: replace a run that `run_dir` holds (only after every check has passed).
    """
    run_dir = Path(run_dir)
    action, record = plan_run(run_dir, cfg, model_cfg, data, resume=resume, overwrite=overwrite)
    if action == "done":
        return _finished(run_dir, record, cfg, data) | {"reused": True}
    continuing = action == "continue"
    new = {
        "format": RUN_FORMAT,
        "label": label,
        "run_id": record["run_id"] if continuing else uuid.uuid4().hex,
        "state": "training",
        "started": record["started"] if continuing else _now(),
        "settings": run_settings(cfg, model_cfg),
        "data": data_record(data),
    }

    def on_start() -> None:  # every input checked: now the run directory may change
        if action == "replace":
            _clear(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "run.json", new)
        used = dataclasses.replace(cfg.data, path=new["data"]["path"])  # the store, absolute
        write_text_atomic(run_dir / "config.toml", to_toml(dataclasses.replace(cfg, data=used)))

    summary = train(
        cfg,
        data,
        run_dir,
        model_cfg=model_cfg,
        resume=continuing and (run_dir / "last.pt").exists(),  # else killed before a checkpoint
        progress=progress,
        on_start=on_start,
    )
    failed = _failure(summary)
    new |= {"state": "failed" if failed else "finished", "finished": _now(), "summary": summary}
    if failed:
        new["failed"] = failed
    write_json_atomic(run_dir / "run.json", new)
    return _finished(run_dir, new, cfg, data)


def _failure(summary: dict) -> str:
    """Why a finished training is not worth evaluating ("" when it is)."""
    if not math.isfinite(summary["best_val"]):
        reason = summary["stopped"] or "every validation forecast was non-finite"
        return (
            f"never produced a finite validation score ({reason}); not evaluated at its "
            f"untrained weights"
        )
    if summary["steps"] == 0 and summary["stopped"]:
        return (
            f"made no optimiser step ({summary['stopped']}); not evaluated at its untrained weights"
        )
    return ""


def _finished(run_dir: Path, record: dict, cfg: RunConfig, data: Dataset) -> dict:
    """The results of a run that has finished (or failed): metrics, predictions, summary."""
    summary = record["summary"]
    if record["state"] == "failed":
        metrics = {"label": record["label"], "run_id": record["run_id"], "failed": record["failed"]}
        write_json_atomic(run_dir / "metrics.json", metrics)
        return {"failed": record["failed"], "train": summary, "predictions": {}}
    return evaluate_run(run_dir, cfg=cfg, data=data) | {"train": summary}


def _existing_run(run_dir: Path, *, lenient: bool = False) -> dict | None:
    """The record of the run in `run_dir`; None when there is none (no folder, or an empty one).

    Raises UserError when the folder holds something other than a run (never written into),
    or a run.json that cannot be read (unless `lenient`: it is then to be replaced)."""
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run directory; choose another --out")
    if not (run_dir / "run.json").exists():
        if any(p for p in run_dir.iterdir() if not p.name.endswith(".tmp")):
            raise UserError(
                f"{run_dir} exists and is not a run directory (no run.json): nothing in it is "
                f"overwritten; choose another --out"
            )
        return None
    try:
        return read_record(run_dir)
    except UserError:
        if lenient:
            return {"state": "unreadable", "run_id": "", "label": ""}
        raise


def read_record(run_dir: Path) -> dict:
    """Return the run.json of `run_dir`, checked; UserError when it is missing or malformed."""
    f = Path(run_dir) / "run.json"
    if not f.is_file() or not (Path(run_dir) / "config.toml").is_file():
        raise UserError(
            f"{run_dir} is not a run directory (no run.json/config.toml); give the folder "
            f"`train` wrote"
        )
    try:
        record = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError) as err:
        raise UserError(
            f"{f} is damaged ({type(err).__name__}): the run cannot be trusted; train it again "
            f"(--overwrite replaces it)"
        ) from None
    if isinstance(record, dict) and "format" not in record and "data_path" in record:
        raise UserError(
            f"{run_dir} was written by an earlier warp-phys that recorded neither its state nor "
            f"its data's fingerprint, so whether it finished cannot be told; train it again "
            f"(--overwrite replaces it)"
        )
    if not _well_formed(record):
        raise UserError(
            f"{f} is malformed (expected the record of a run of format {RUN_FORMAT}); train "
            f"the run again (--overwrite replaces it)"
        )
    return record


def _well_formed(r) -> bool:
    if not isinstance(r, dict) or r.get("format") != RUN_FORMAT or r.get("state") not in STATES:
        return False
    data, settings = r.get("data"), r.get("settings")
    ok = isinstance(r.get("label"), str) and isinstance(r.get("run_id"), str)
    ok &= isinstance(settings, dict) and isinstance(settings.get("model"), dict)
    ok &= isinstance(data, dict) and all(
        isinstance(data.get(k), str) for k in ("path", "fingerprint")
    )
    if r.get("state") != "training":
        ok &= isinstance(r.get("summary"), dict)
    return ok and (r["state"] != "failed" or isinstance(r.get("failed"), str))


def _check_same(run_dir: Path, record: dict, settings: dict, data_rec: dict) -> None:
    """Raise UserError naming the first difference between a run and what resuming it asks."""
    if record["data"]["fingerprint"] != data_rec["fingerprint"]:
        raise UserError(
            f"{run_dir} was trained on another dataset (store {record['data']['path']}, "
            f"fingerprint {record['data']['fingerprint'][:19]}...; now {data_rec['path']}, "
            f"{data_rec['fingerprint'][:19]}...): --resume continues only the same run; use "
            f"--overwrite to start afresh, or choose another --out"
        )
    diff = _difference(record["settings"], settings)
    if diff:
        raise UserError(
            f"{run_dir} was trained with other settings ({diff}): --resume continues only a run "
            f"with the same settings; restore them, or use --overwrite to start afresh"
        )


def _difference(old, new, prefix: str = "") -> str:
    """The first key where two nested tables differ: ``train.steps = 60 in the run, 400 now``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = _difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return ""
    if old != new:
        return f"{prefix.rstrip('.')} = {old!r} in the run, {new!r} now"
    return ""


def _clear(run_dir: Path) -> None:
    """Remove what a run wrote (`RUN_FILES`, temporary files); leave anything else alone."""
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for p in run_dir.glob("*.tmp"):
        p.unlink(missing_ok=True)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_run(
    run_dir: Path,
    data: Dataset | None = None,
    *,
    data_path: str | Path | None = None,
    allow_unfinished: bool = False,
):
    """Return (config, label, model config, dataset, model from best.pt, record) of a run.

    The dataset is `data`, or the store at `data_path`, or the one the run recorded (absolute
    path); whichever it is, its fingerprint must be the one the run was trained on.

    Raises:
        UserError: not a run directory, a damaged record or config, a failed run, a run still
            training (unless `allow_unfinished`), a missing or different store.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    try:
        cfg = load_config(str(run_dir / "config.toml"))
    except UserError as err:
        raise UserError(f"the config of run {run_dir} is damaged: {err}") from None
    if record["state"] == "failed":
        raise UserError(
            f"run {run_dir} failed in training ({record['failed']}); there is nothing to "
            f"evaluate: train it again (--overwrite replaces it)"
        )
    if record["state"] == "training" and not allow_unfinished:
        raise UserError(
            f"run {run_dir} has not finished training (it was interrupted, or is still "
            f"running): finish it with `warp-phys train ... --out {run_dir} --resume`, or "
            f"evaluate its best checkpoint so far with --allow-unfinished (marked unfinished)"
        )
    model_cfg = model_config(record["settings"]["model"], "run.json settings.model")
    data = data or _recorded_data(run_dir, record, data_path)
    if data.fingerprint != record["data"]["fingerprint"]:
        raise UserError(
            f"the store {data.path} is not the one run {run_dir} was trained on (its content "
            f"fingerprint differs: it was regenerated or changed); give the original store "
            f"with --data"
        )
    model = build_model(model_cfg, data)
    load_weights(model, load_checkpoint(run_dir / "best.pt")["model"], run_dir / "best.pt")
    return cfg, record["label"], model_cfg, data, model, record


def _recorded_data(run_dir: Path, record: dict, data_path) -> Dataset:
    path = Path(data_path) if data_path else Path(record["data"]["path"])
    if not path.exists():
        raise UserError(
            f"the store run {run_dir} was trained on is not at {path} any more; give its new "
            f"place with --data PATH"
        )
    return load_dataset(path, system=record["data"].get("system", ""))


def evaluate_run(
    run_dir: Path,
    *,
    cfg: RunConfig | None = None,
    data: Dataset | None = None,
    device: str | None = None,
    data_path: str | Path | None = None,
    allow_unfinished: bool = False,
) -> dict:
    """Evaluate a run's best checkpoint on test and test_ood; write metrics.json; return results.

    metrics.json carries the run id and state; the metrics of a run that had not finished
    training (only with `allow_unfinished`) say so under "unfinished"."""
    loaded_cfg, label, _, data, model, record = load_run(
        run_dir, data, data_path=data_path, allow_unfinished=allow_unfinished
    )
    cfg = cfg or loaded_cfg
    dev = resolve_device(cfg.train, device)
    model.to(dev)
    L = cfg.data.context
    results, preds = {}, {}
    with torch_threads(cfg.train.threads):
        for split in EVAL_SPLITS:
            out = evaluate_split(model, data, split, L, device=dev)
            results[split] = out["metrics"]
            preds[split] = (out["mean"], out["std"])
    n_params = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    metrics = {
        "label": label,
        "run_id": record["run_id"],
        "state": record["state"],
        "context": L,
        "n_params": n_params,
        "splits": results,
    }
    if record["state"] == "training":
        metrics["unfinished"] = "training had not finished: the best checkpoint so far"
    write_json_atomic(Path(run_dir) / "metrics.json", metrics, indent=None)
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
    return json_safe(obj)
