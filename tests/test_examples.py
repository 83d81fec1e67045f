"""The examples run (at tiny sizes), and the library changes no global state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    env = {"MPLBACKEND": "Agg", "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    got = subprocess.run(
        [sys.executable, str(script), "--tiny"], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    assert "outputs in" in got.stdout


def test_fit_restores_threads_and_leaves_the_matplotlib_backend_alone(msd_store, tmp_path):
    import matplotlib

    from warp_phys.baselines import GRUForecaster
    from warp_phys.config import TrainConfig
    from warp_phys.data import load_dataset
    from warp_phys.report import plot_recovery
    from warp_phys.train import fit

    matplotlib.use("svg")  # a user's choice, e.g. a notebook's inline backend
    threads = torch.get_num_threads()
    data = load_dataset(msd_store)
    model = GRUForecaster(state_dim=2, hidden=4)
    got = fit(model, data, context=100, config=TrainConfig(steps=2, threads=1), progress=False)
    plot_recovery({"models": {}}, tmp_path / "r.png")
    assert got.model is model and len(got.history) == 3  # init + 2 steps
    assert torch.get_num_threads() == threads
    assert matplotlib.get_backend() == "svg"


def test_fit_names_a_state_size_mismatch(msd_store):
    from warp_phys.baselines import GRUForecaster
    from warp_phys.data import load_dataset
    from warp_phys.train import fit

    with pytest.raises(ValueError, match="forecasts 3 states but the data has 2"):
        fit(GRUForecaster(state_dim=3), load_dataset(msd_store), context=100)


@pytest.mark.parametrize("enabled", [True, False])
def test_import_leaves_the_garbage_collector_as_it_found_it(enabled):
    # the package pauses the collector while torch and sympy import (warp_phys/__init__.py)
    code = (
        f"import gc\n{'gc.enable()' if enabled else 'gc.disable()'}\n"
        "import warp_phys, warp_phys.cli\nprint(gc.isenabled())"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() == str(enabled)
