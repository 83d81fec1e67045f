"""The `warp-phys` command line: generate, info, and one clear line (exit 2) for each bad input."""

from __future__ import annotations

import numpy as np
import pytest

from warp_phys.cli import main
from warp_phys.store import is_complete, open_split

SMALL = [
    "--n-train",
    "3",
    "--n-val",
    "1",
    "--n-test",
    "1",
    "--n-test-ood",
    "2",
    "--chunk",
    "2",
    "-q",
]


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warp-phys"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_systems_lists_the_registry(capsys):
    rc, out, _ = run(capsys, ["systems"])
    assert rc == 0 and "msd" in out and "lorenz63" in out


def test_generate_prints_a_summary_info_repeats_it_and_a_rerun_is_a_noop(tmp_path, capsys):
    path = tmp_path / "sine.zarr"
    rc, out, _ = run(capsys, ["generate", "sine", "--out", path, *SMALL, "--seed", "4"])
    assert rc == 0 and is_complete(path)
    assert "system 'sine'" in out and "seed 4" in out and "(3, 16, 1)" in out and "x [" in out
    assert f'xarray.open_zarr("{path}", group="train")' in out
    rc, info, _ = run(capsys, ["info", path])
    assert rc == 0 and info == out
    rc, again, _ = run(capsys, ["generate", "sine", "--out", path, *SMALL, "--seed", "4"])
    assert rc == 0 and again.startswith(
        f"{path} is already complete with these arguments (verified); nothing to do"
    )


def test_generate_applies_range_overrides(tmp_path, capsys):
    path = tmp_path / "msd.zarr"
    argv = [
        "generate",
        "msd",
        "--out",
        path,
        *SMALL,
        "--range",
        "k=5,6",
        "--ood-range",
        "m=0.045,0.05",
    ]
    assert run(capsys, argv)[0] == 0
    k = open_split(path, "train").params.sel(parameter="k").values
    m = open_split(path, "test_ood").params.sel(parameter="m").values
    assert ((k >= 5) & (k <= 6)).all() and ((m >= 0.045) & (m <= 0.05)).all()
    assert open_split(path, "val").attrs["ranges"]["k"] == [5.0, 6.0]


BAD = {  # name: (argv after "generate", fragments of the one error line)
    "unknown system": (["nope"], ["unknown system 'nope'", "msd", "lorenz63"]),
    "unknown parameter": (["msd", "--range", "zz=1,2"], ["unknown parameter 'zz'", "m, k, c"]),
    "low above high": (["msd", "--range", "k=16,4"], ["'k'", "low <= high"]),
    "ood low above high": (["msd", "--ood-range", "c=0.3,0.01"], ["'c'", "low <= high"]),
    "malformed range": (["msd", "--range", "k=4"], ["--range expects NAME=LO,HI", "'k=4'"]),
    "range given twice": (["msd", "--range", "k=4,5", "--range", "k=6,7"], ["'k' twice"]),
    "zero trajectories": (
        ["msd", "--n-train", "0"],
        ["'train' must be a positive integer", "--n-train"],
    ),
    "negative trajectories": (["msd", "--n-test-ood", "-5"], ["got -5", "--n-test-ood"]),
    "zero chunk": (["msd", "--chunk", "0"], ["chunk must be a positive", "--chunk 256"]),
    "negative seed": (["msd", "--seed", "-1"], ["seed must be a non-negative integer"]),
    "not a number": (["msd", "--n-val", "many"], ["--n-val", "'many'", "--help"]),
    "zero tolerance": (["msd", "--rtol", "0"], ["rtol must be a positive"]),
    "wrong-shape vector field": (["test_store_wrong_shape"], ["test_store_wrong_shape", "shape"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_generate_input_is_one_line_and_writes_nothing(case, tmp_path, capsys, test_systems):
    argv, fragments = BAD[case]
    out = tmp_path / "out.zarr"
    rc, _, err = run(capsys, ["generate", argv[0], "--out", out, "-q", *argv[1:]])
    assert_one_line_error(rc, err, *fragments)
    assert not out.exists()


@pytest.mark.parametrize("what", ["file", "directory"])
def test_output_path_holding_something_else_is_refused(what, tmp_path, capsys):
    out = tmp_path / "out"
    if what == "file":
        out.write_text("precious")
    else:
        out.mkdir()
        (out / "data.csv").write_text("precious")
    rc, _, err = run(capsys, ["generate", "sine", "--out", out, *SMALL])
    assert_one_line_error(rc, err, str(out), "not a warp-phys store", "pick another --out")
    assert sorted(p.name for p in tmp_path.rglob("*")) == (
        ["out"] if what == "file" else ["data.csv", "out"]
    )


def test_other_arguments_on_an_existing_store_are_refused(tmp_path, capsys):
    out = tmp_path / "sine.zarr"
    assert run(capsys, ["generate", "sine", "--out", out, *SMALL])[0] == 0
    rc, _, err = run(capsys, ["generate", "sine", "--out", out, *SMALL, "--seed", "9"])
    assert_one_line_error(
        rc, err, "other arguments", "seed: stored 0, asked 9", "pick another --out"
    )


def test_divergence_is_one_line_and_the_store_stays_incomplete(tmp_path, capsys, test_systems):
    out = tmp_path / "blow.zarr"
    rc, _, err = run(capsys, ["generate", "test_store_blow_up", "--out", out, *SMALL])
    assert_one_line_error(
        rc, err, "diverged", "split 'test_ood'", "trajectory 0 (a=", "t=", "incomplete"
    )
    assert out.exists() and not is_complete(out)
    rc, _, err = run(capsys, ["info", out])
    assert_one_line_error(
        rc, err, "incomplete", "resume it with `warp-phys generate test_store_blow_up"
    )


def test_info_on_missing_or_foreign_or_truncated_stores(tmp_path, capsys, msd_store):
    rc, _, err = run(capsys, ["info", tmp_path / "missing.zarr"])
    assert_one_line_error(rc, err, "no store at", "warp-phys generate SYSTEM --out")
    (tmp_path / "junk").mkdir()
    rc, _, err = run(capsys, ["info", tmp_path / "junk"])
    assert_one_line_error(rc, err, "not a warp-phys store")
    rc, out, _ = run(capsys, ["info", msd_store])
    assert rc == 0 and "(10, 256, 2)" in out


def test_summary_value_ranges_match_the_data(tmp_path, capsys):
    out = tmp_path / "sine.zarr"
    rc, text, _ = run(capsys, ["generate", "sine", "--out", out, *SMALL])
    y = open_split(out, "train")["y"].values
    assert f"x [{np.min(y):.4g}, {np.max(y):.4g}]" in text
