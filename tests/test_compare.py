"""The compare workflow end to end on a tiny preset, and the CLI around it."""

import json

import pytest
import torch
import xarray as xr

from warp_phys.cli import main
from warp_phys.compare import compare
from warp_phys.config import load_config

torch.set_num_threads(1)

TINY_MSD = [
    "name=tiny",
    "data.system=msd",
    "data.n_train=16",
    "data.n_val=4",
    "data.n_test=6",
    "data.n_test_ood=6",
    "data.chunk=16",
    "train.steps=3",
    "train.eval_every=3",
    "train.batch_size=4",
    "model.hidden=8",
    "model.prior_options={width=8, depth=1}",
    'models.warp={prior="blackbox"}',
    'models.warp_phys={prior="ode", hold_after_context=true, prior_options={fixed={m=0.03}, spread=3.0}}',
    'models.gru={kind="gru"}',
    'models.lstm={kind="lstm"}',
]


@pytest.fixture(scope="module")
def tiny_compare(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    cfg = load_config(None, TINY_MSD, values={"out_dir": str(out)})
    summary = compare(cfg, progress=False)
    return out / "tiny", summary


def test_compare_writes_results_table_plots_and_predictions(tiny_compare):
    out, summary = tiny_compare
    for name in ("results.json", "results.md", "forecasts.png", "horizon.png", "recovery.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"warp", "warp_phys", "gru", "lstm"}
    for res in results["models"].values():
        assert res["n_params"] > 0 and res["train_seconds"] > 0
        for split in ("test", "test_ood"):
            r = res["splits"][split]
            assert {
                "mse",
                "mae",
                "median_mse",
                "ratio_to_persistence",
                "ratio_to_zero",
                "ratio_to_linear_fit",
            } <= set(r)
        assert {"in_range", "out_of_range"} <= set(res["splits"]["test_ood"])
    rec = results["models"]["warp_phys"]["splits"]["test"]["recovery"]
    assert set(rec) == {"k/m", "c/m"}  # the MSD's identifiable combinations, not m, k, c alone
    assert results["models"]["warp"]["splits"]["test"]["recovery"] == {}
    assert "| warp_phys |" in (out / "results.md").read_text()


def test_models_that_stopped_early_or_blew_up_are_flagged_in_the_table(tiny_compare):
    from warp_phys.report import results_table

    _, summary = tiny_compare
    assert "## Training" not in results_table(summary)  # every model trained cleanly
    models = {k: dict(v) for k, v in summary["models"].items()}
    models["warp"] |= {"skipped_batches": 10, "stopped": "non-finite loss ... at step 3"}
    models["warp"]["splits"] = dict(models["warp"]["splits"])
    models["warp"]["splits"]["test_ood"] = models["warp"]["splits"]["test_ood"] | {"n_nonfinite": 2}
    table = results_table(summary | {"models": models})
    assert "- warp: 10 batches skipped (non-finite loss or gradient); stopped early: " in table
    assert "- gru:" not in table
    assert table.count("blew up") == 1
    assert "(inf or NaN, counted as infinite error): warp 2" in table


def test_predictions_open_in_xarray_with_truth_beside_each_model(tiny_compare):
    out, _ = tiny_compare
    ds = xr.open_zarr(out / "predictions.zarr", group="test_ood")
    assert ds.prediction.dims == ("model", "trajectory", "time", "state")
    assert list(ds.model.values) == ["warp", "warp_phys", "gru", "lstm"]
    assert ds.truth.shape == ds.prediction.shape[1:] == (6, 256, 2)
    assert bool(ds.prediction.isel(time=slice(1, None)).notnull().all())
    assert int(ds.attrs["context"]) == 100


def test_compare_resume_reuses_finished_models(tiny_compare):
    out, summary = tiny_compare
    cfg = load_config(None, TINY_MSD, values={"out_dir": str(out.parent)})
    files = ("best.pt", "last.pt", "history.json", "train_summary.json")
    before = {
        (lab, f): (out / lab / f).stat().st_mtime_ns for lab in summary["models"] for f in files
    }
    again = compare(cfg, resume=True, progress=False)
    after = {
        (lab, f): (out / lab / f).stat().st_mtime_ns for lab in summary["models"] for f in files
    }
    assert after == before  # nothing retrained: a deterministic retrain would rewrite them
    for label, res in summary["models"].items():
        assert again["models"][label]["splits"]["test"]["mse"] == pytest.approx(
            res["splits"]["test"]["mse"]
        )


def test_cli_evaluate_reexports_a_run(tiny_compare, capsys):
    out, _ = tiny_compare
    assert main(["evaluate", str(out / "gru")]) == 0
    assert "gru test: forecast MSE" in capsys.readouterr().out
    ds = xr.open_zarr(out / "gru" / "predictions.zarr", group="test")
    assert list(ds.model.values) == ["gru"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "no_such_thing"], "unknown preset 'no_such_thing'; presets in"),
        (["train", "msd_small", "--set", "train.lrr=1"], "unknown config key train.lrr"),
        (["evaluate", "/nonexistent/run"], "is not a run directory"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
