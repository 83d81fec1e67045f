"""The compare workflow: same data, same budget, vanilla WARP vs WARP-Phys vs GRU vs LSTM.

runs/out/<name>/
    results.json  results.md  forecasts.png  horizon.png  recovery.png  predictions.zarr
    <label>/      one run directory per model (see run.py)
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from warp_phys import distributed, location
from warp_phys.atomic import write_json_atomic, write_text_atomic
from warp_phys.config import RunConfig
from warp_phys.errors import UserError
from warp_phys.report import plot_forecasts, plot_horizon, plot_recovery, results_table
from warp_phys.run import (
    EVAL_SPLITS,
    plan_run,
    predictions_dataset,
    prepare_data,
    show_bars,
    train_and_evaluate,
    write_predictions,
)

log = logging.getLogger(__name__)

# Used when a preset names no [models.*]: the four models of the paper's comparison, sized for
# a CPU. WARP-Phys is the in-context least-squares prior when the system is linear in its
# unknowns (every built-in one is), else the ODE prior with parameters read from θ.
DEFAULT_MODELS = {
    "warp": {"kind": "warp", "prior": "blackbox"},  # the prior's CPU-sized defaults
    "warp_phys": {
        "kind": "warp",
        "prior": "lsq",
        "transition": "prior",
        "init_state": "learned",
        "hold_after_context": True,
        # only the start-state mixture is learned: one-step (teacher-forced) loss, fast lr
        "train": {"lr": 0.05, "teacher_forced_fraction": 1.0},
    },
    "gru": {"kind": "gru"},
    "lstm": {"kind": "lstm"},
}
ODE_PHYS = {"kind": "warp", "prior": "ode", "hold_after_context": True}


def default_models(system) -> dict:
    """The default models for `system`: the ODE prior when the lsq prior does not apply."""
    from warp_phys.identify import linear_form

    models = dict(DEFAULT_MODELS)
    try:
        linear = linear_form(system) is not None
    except UserError:  # nothing unknown: no physics prior to learn
        linear = False
        models.pop("warp_phys")
    if not linear and "warp_phys" in models:
        models["warp_phys"] = ODE_PHYS
    return models


def compare(
    cfg: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict:
    """Train and evaluate every model of `cfg`; write the results, table, plots and predictions.

    Args:
        resume: continue an interrupted compare: each model's run continues only when its
            settings and data are the ones recorded (else one error naming the difference), a
            missing one is trained.
        overwrite: replace the runs of an earlier compare of the same name (once every
            model's inputs have been checked).

    Without either, a model already trained in this place with the same settings and data is
    reused (and said so); a run with other settings, or an unfinished one, is an error.
    Under torchrun every process trains each model; rank 0 alone writes and returns the
    summary (the others return ``{}``).
    """
    out = Path(cfg.out_dir) / cfg.name
    distributed.on_main(lambda: _check_output(out))  # under torchrun: rank 0 reads and writes
    data = prepare_data(cfg, progress=show_bars(progress))
    if not cfg.models:
        cfg = dataclasses.replace(cfg, models=default_models(data.system))

    def plan() -> dict:  # every model's run is checked before any is trained
        flags = {
            label: {
                "resume": resume and (out / label / "run.json").exists(),
                "overwrite": overwrite,
            }
            for label in cfg.models
        }
        for label in cfg.models:
            plan_run(out / label, cfg, cfg.model_for(label), data, **flags[label])
        return flags

    flags = distributed.on_main(plan)  # a failing compare writes nothing
    main = distributed.current().main
    results, preds = {}, {}
    for label in cfg.models:
        got = train_and_evaluate(
            cfg, data, label, cfg.model_for(label), out / label, progress=progress, **flags[label]
        )
        if not main:
            continue
        if got.get("reused"):
            log.warning("%s: already trained with these settings and data; reused", label)
        results[label] = summarize(got)
        if "failed" in got:
            log.warning("%s failed: %s", label, got["failed"])
        else:
            preds[label] = got["predictions"]
    if not main:
        return {}
    summary = {
        "name": cfg.name,
        "system": data.system.name,
        "data": location.absolute(data.path),
        "data_fingerprint": data.fingerprint,
        "context": cfg.data.context,
        "noise": data.noise,
        "models": results,
    }
    write_json_atomic(out / "results.json", summary)
    table = results_table(summary)
    write_text_atomic(out / "results.md", table)
    datasets = {
        s: predictions_dataset(data, s, cfg.data.context, {k: v[s] for k, v in preds.items()})
        for s in EVAL_SPLITS
    }
    shutil.rmtree(out / "predictions.zarr", ignore_errors=True)
    write_predictions(out / "predictions.zarr", datasets)
    plot_forecasts(datasets["test_ood"], out / "forecasts.png")
    plot_horizon(summary, data.times, cfg.data.context, out / "horizon.png")
    plot_recovery(summary, out / "recovery.png")
    return summary


def _check_output(out: Path) -> None:
    """Refuse an output folder that holds something other than a compare."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file; pick another --set name=... or out_dir")
    ours = (out / "results.json").exists() or any((p / "run.json").exists() for p in out.iterdir())
    if not ours and any(out.iterdir()):
        raise UserError(
            f"{out} exists and holds something else; pick another --set name=... or delete it"
        )


def summarize(got: dict) -> dict:
    """Condense one model's metrics to what results.json reports per split."""
    train = got["train"]
    head = {
        "n_params": train["n_params"],
        "train_seconds": train["train_seconds"],
        "train_steps": train["steps"],
        "best_step": train["best_step"],
        "skipped_batches": train.get("skipped_batches", 0),
        "stopped": train.get("stopped", ""),
    }
    if "failed" in got:
        return head | {"failed": got["failed"], "splits": {}}
    m = got["metrics"]
    per_split = {}
    for split, res in m["splits"].items():
        model = res["model"]
        row = {k: model[k] for k in ("mse", "mae", "median_mse", "n_nonfinite")}
        row |= {k: v for k, v in model.items() if k.startswith("ratio_to_")}
        row["best_reference"] = model.get("best_reference", "")
        row["per_horizon_mse"] = model["per_horizon_mse"]
        for part in ("in_range", "out_of_range"):
            if part in model:
                row[part] = model[part]
        if "vpt" in model:
            row["vpt"] = {k: model["vpt"][k] for k in ("mean", "median")}
        row["references"] = {k: _reference_row(v) for k, v in res["references"].items()}
        row["recovery"] = res["recovery"]
        per_split[split] = row
    return head | {"n_params": m["n_params"], "splits": per_split}


def _reference_row(v: dict) -> dict:
    if "not_applicable" in v:
        return {"not_applicable": v["not_applicable"]}
    row = {k: v[k] for k in ("mse", "median_mse")}
    row |= {p: v[p] for p in ("in_range", "out_of_range") if p in v}
    if "vpt" in v:
        row["vpt"] = {k: v["vpt"][k] for k in ("mean", "median")}
    for k in ("seconds_per_trajectory", "method", "recovery"):
        if k in v:
            row[k] = v[k]
    return row
