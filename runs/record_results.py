"""Copy a compare run's table into runs/results/NAME.md with the headline ratios.

    python runs/record_results.py NAME "how it was run (command, machine, load)"

runs/out/ is git-ignored; runs/results/ keeps the figures in the repository.
"""

import json
import math
import sys
from pathlib import Path


def ratios(r: dict, split: str) -> list[str]:
    lines = []
    rows = [("mse", "mean MSE"), ("median_mse", "median MSE")]
    rows += [(p, f"{p.replace('_', ' ')} mean MSE") for p in ("in_range", "out_of_range")]
    for key, name in rows:
        vals = {}
        for lab, m in r["models"].items():
            v = m["splits"][split].get(key)
            v = v["mse"] if isinstance(v, dict) else v
            vals[lab] = None if v is None else float(v)  # JSON holds inf/nan as strings
        if "warp_phys" not in vals or any(v is None or math.isnan(v) for v in vals.values()):
            continue
        wp = vals.pop("warp_phys")
        best = min(vals, key=vals.get)
        lines.append(
            f"| {split} {name} | {wp:.3g} | {vals[best]:.3g} ({best}) | {vals[best] / wp:.1f}x |"
        )
    return lines


def main() -> None:
    name, how = sys.argv[1], sys.argv[2]
    out = Path("runs/out") / name
    r = json.loads((out / "results.json").read_text())
    lines = [
        f"<!-- recorded from runs/out/{name} (git-ignored) by runs/record_results.py -->",
        "",
        how,
        "",
        "## WARP-Phys against the best other learned model",
        "",
        "| figure | WARP-Phys | best other | ratio |",
        "|---|---|---|---|",
    ]
    for split in ("test", "test_ood"):
        lines += ratios(r, split)
    rec = r["models"].get("warp_phys", {}).get("splits", {})
    for split in ("test", "test_ood"):
        for pname, v in rec.get(split, {}).get("recovery", {}).items():
            lines.append(
                f"| {split} median relative error of recovered {pname} | "
                f"{100 * v['median_rel_error']:.1f}% | | |"
            )
    Path("runs/results").mkdir(exist_ok=True)
    (Path("runs/results") / f"{name}.md").write_text(
        "\n".join(lines) + "\n\n" + (out / "results.md").read_text()
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
