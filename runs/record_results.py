"""Record compare runs in runs/results/ (runs/out/ is git-ignored).

    python runs/record_results.py NAME "how it was run (command, machine, load)"
    python runs/record_results.py --summary NAME|RUN_FOLDER [...]

The first copies one run's table into runs/results/NAME.md, headed by WARP-Phys against the
best other learned model and against ode_fit. The second writes runs/results/summary.md: one
table across systems (clean and noisy), WARP-Phys beside the best black-box model and ode_fit,
with the recovered parameters and, for chaotic systems, the valid prediction time.
"""

import json
import math
import sys
from pathlib import Path

BLACK_BOX = ("warp", "gru", "lstm")
PHYS = "warp_phys"


def _f(v) -> float:
    return float("nan") if v is None else float(v)  # JSON holds inf/nan as strings


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


def ratios(r: dict, split: str) -> list[str]:
    lines = []
    rows = [("mse", "mean MSE"), ("median_mse", "median MSE")]
    rows += [(p, f"{p.replace('_', ' ')} mean MSE") for p in ("in_range", "out_of_range")]
    models = {k: m for k, m in r["models"].items() if "failed" not in m}
    for key, name in rows:
        vals = {}
        for lab, m in models.items():
            v = m["splits"][split].get(key)
            vals[lab] = None if v is None else _f(v["mse"] if isinstance(v, dict) else v)
        if PHYS not in vals or any(v is None or math.isnan(v) for v in vals.values()):
            continue
        wp = vals.pop(PHYS)
        if not vals:
            continue
        best = min(vals, key=vals.get)
        ode = models[PHYS]["splits"][split]["references"].get("ode_fit", {})
        ode_v = ode.get(key)
        ode_v = (
            _f(ode_v["mse"] if isinstance(ode_v, dict) else ode_v)
            if ode_v is not None
            else math.nan
        )
        lines.append(
            f"| {split} {name} | {_fmt(wp)} | {_fmt(vals[best])} ({best}) | "
            f"{_fmt(vals[best] / wp)}x | {_fmt(ode_v)} |"
        )
    return lines


def record(name: str, how: str) -> None:
    out = Path("runs/out") / name
    r = json.loads((out / "results.json").read_text())
    lines = [
        f"<!-- recorded from runs/out/{name} (git-ignored) by runs/record_results.py -->",
        "",
        how,
        "",
        "## WARP-Phys against the best other learned model, and ode_fit",
        "",
        "| figure | WARP-Phys | best other | ratio | ode_fit |",
        "|---|---|---|---|---|",
    ]
    for split in ("test", "test_ood"):
        lines += ratios(r, split)
    rec = r["models"].get(PHYS, {}).get("splits", {})
    for split in ("test", "test_ood"):
        ode = rec.get(split, {}).get("references", {}).get("ode_fit", {}).get("recovery", {})
        for pname, v in rec.get(split, {}).get("recovery", {}).items():
            o = ode.get(pname, {}).get("median_rel_error")
            lines.append(
                f"| {split} median relative error of recovered {pname} | "
                f"{100 * v['median_rel_error']:.3g}% | | | "
                + (f"{100 * o:.3g}%" if o is not None else "")
                + " |"
            )
    Path("runs/results").mkdir(exist_ok=True)
    (Path("runs/results") / f"{name}.md").write_text(
        "\n".join(lines) + "\n\n" + (out / "results.md").read_text()
    )
    print("\n".join(lines))


def _row(name: str, r: dict) -> list[str]:
    """Summary rows of one compare: per split, WARP-Phys / best black-box / ode_fit."""
    models = {k: m for k, m in r["models"].items() if "failed" not in m}
    rows = []
    for split in ("test", "test_ood"):
        wp = models.get(PHYS, {}).get("splits", {}).get(split)
        if wp is None:
            continue
        boxes = {k: models[k]["splits"][split] for k in BLACK_BOX if k in models}
        best = min(boxes, key=lambda k: _f(boxes[k]["mse"])) if boxes else None
        ode = wp["references"].get("ode_fit", {})
        rec = ", ".join(
            f"{p} {100 * v['median_rel_error']:.2g}%" for p, v in wp["recovery"].items()
        )
        ode_rec = ", ".join(
            f"{p} {100 * v['median_rel_error']:.2g}%" for p, v in ode.get("recovery", {}).items()
        )

        def pair(m: dict) -> str:
            return f"{_fmt(_f(m['mse']))} / {_fmt(_f(m['median_mse']))}" if m else "-"

        def vpt(m: dict) -> str:
            v = m.get("vpt") if m else None
            return f" (VPT {_fmt(v['median'])})" if v else ""

        bb = f"{pair(boxes[best])}{vpt(boxes[best])} ({best})" if best else "-"
        ratio = _f(boxes[best]["mse"]) / _f(wp["mse"]) if best else math.nan
        ratio_med = _f(boxes[best]["median_mse"]) / _f(wp["median_mse"]) if best else math.nan
        noise = r.get("noise") or 0
        rows.append(
            f"| {r['system']} | {f'{100 * noise:g}%' if noise else 'clean'} | {split} | "
            f"{pair(wp)}{vpt(wp)} | {bb} | {_fmt(ratio)}x / {_fmt(ratio_med)}x | "
            f"{pair(ode) if 'mse' in ode else 'n/a'}{vpt(ode)} | {rec} | {ode_rec} | {name} |"
        )
    return rows


def summary(names: list[str]) -> None:
    lines = [
        "<!-- written by `python runs/record_results.py --summary ...` from runs/out -->",
        "",
        "# WARP-Phys across systems",
        "",
        "Forecast MSE mean / median on the forecast steps, against the clean trajectories; "
        "VPT = median valid prediction time in Lyapunov times (chaotic systems); parameters = "
        "median relative error of the identifiable parameters at the end of the context. "
        "Best black-box = the lowest mean MSE of vanilla WARP, GRU and LSTM; ratio = its "
        "mean / WARP-Phys's mean, and the same for medians. Commands and machine load: "
        "each preset's own file in this folder.",
        "",
        "| system | noise | split | WARP-Phys | best black-box | ratio mean / median | "
        "ode_fit | WARP-Phys parameters | ode_fit parameters | preset |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:  # a preset's name (its run in runs/out) or the path of a run folder
        folder = Path(name) if "/" in name else Path("runs/out") / name
        r = json.loads((folder / "results.json").read_text())
        lines += _row(folder.name, r)
    Path("runs/results").mkdir(exist_ok=True)
    (Path("runs/results") / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    if sys.argv[1] == "--summary":
        summary(sys.argv[2:])
    else:
        record(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    main()
