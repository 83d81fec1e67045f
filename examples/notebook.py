"""warp-phys from a notebook: define a system, simulate it, fit WARP, WARP-Phys and a GRU,
forecast, compare with the references, plot. Each block is a notebook cell.

    python examples/notebook.py            # a few minutes on 2 cores
    python examples/notebook.py --tiny     # seconds (what the test suite runs)
"""

import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import xarray as xr

from warp_phys import Box, Param, SymbolicSystem, register_system
from warp_phys.baselines import GRUForecaster
from warp_phys.config import TrainConfig
from warp_phys.data import load_dataset
from warp_phys.evaluate import evaluate_split
from warp_phys.models import Standardized
from warp_phys.root import build_root
from warp_phys.store import generate_store
from warp_phys.train import fit
from warp_phys.warp import WARP

TINY = "--tiny" in sys.argv
out = Path(tempfile.mkdtemp(prefix="warp-phys-example-"))


# %% 1. A system, declared in a cell: a damped oscillator with a cubic spring, k and c unknown
@register_system("example_cubic")
class CubicOscillator(SymbolicSystem):
    """x'' + c x' + k x + x^3 = 0."""

    state = ("x", "v")
    params = {
        "k": Param(1.0, train=(0.5, 1.5), test=(0.3, 2.0)),
        "c": Param(0.2, train=(0.1, 0.3), test=(0.05, 0.4)),
    }
    rhs = ("v", "-c*v - k*x - x**3")
    y0 = Box(low=(-1.5, -0.5), high=(1.5, 0.5))
    t_span = (0.0, 20.0)
    n_steps = 200


# %% 2. Simulate an ensemble into a zarr store (resumable, chunked); open it with xarray
system = CubicOscillator()
n = 16 if TINY else 512
counts = {"train": n, "val": n // 4, "test": n // 4, "test_ood": n // 4}
generate_store(system, out / "cubic.zarr", counts=counts, seed=0, noise=0.02, progress=False)
ds = xr.open_zarr(out / "cubic.zarr", group="train")
print(ds)  # y (clean) and obs (2% observation noise), params, y0

# %% 3. Models built in code: vanilla WARP, WARP-Phys (in-context least squares), a GRU
data = load_dataset(out / "cubic.zarr")
S, dt, context = data.state_dim, data.dt, 50
warp = Standardized(  # black boxes see standardised states
    WARP(root=build_root("blackbox", state_dim=S), state_dim=S, dt=dt, init_state="learned",
         transition="rotation", anchored=True),
    data.offset(), data.scale(),
)  # fmt: skip
phys = WARP(
    root=build_root("lsq", state_dim=S, system=data.system), state_dim=S, dt=dt,
    transition="prior", init_state="learned", hold_after_context=True,
)  # fmt: skip
gru = Standardized(GRUForecaster(state_dim=S, hidden=32), data.offset(), data.scale())

# %% 4. Fit them (each comes back trained, with its history; no files written)
budget = TrainConfig(max_seconds=2 if TINY else 60, eval_every=5 if TINY else 50)
fitted = {
    "warp": fit(warp, data, context=context, config=budget, progress=False),
    "warp_phys": fit(phys, data, context=context, progress=False,
                     config=TrainConfig(max_seconds=budget.max_seconds, lr=0.05,
                                        teacher_forced_fraction=1.0, eval_every=10)),
    "gru": fit(gru, data, context=context, config=budget, progress=False),
}  # fmt: skip
for name, result in fitted.items():
    print(name, "steps", result.summary["steps"], "best val", result.summary["best_val"])

# %% 5. Forecast the out-of-distribution test set; compare with the references
for name, result in fitted.items():
    got = evaluate_split(result.model, data, "test_ood", context)["metrics"]
    refs = {k: v["mse"] for k, v in got["references"].items() if "mse" in v}
    print(f"{name}: forecast MSE {got['model']['mse']:.3g}; references {refs}")
    for p, v in got["recovery"].items():
        print(f"   recovered {p}: median relative error {100 * v['median_rel_error']:.2g}%")

# %% 6. Plot one forecast
ys = data.splits["test_ood"].truth[:1]
with torch.no_grad():
    preds = {
        k: r.model(data.splits["test_ood"].y[:1], context=context).mean[0]
        for k, r in fitted.items()
    }
fig, ax = plt.subplots(figsize=(7, 3))
t = data.times
ax.plot(t, ys[0, :, 0], "k", label="truth")
for k, p in preds.items():
    ax.plot(t[1:], p[:, 0], label=k)
ax.axvline(t[context - 1], color="0.5", ls=":")
ax.legend()
fig.savefig(out / "forecast.png", dpi=100)
print("outputs in", out)
