"""The zarr trajectory store: round trip, same bytes whatever the chunk, resume, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import warp_phys
import warp_phys.store as store
from warp_phys import DivergenceError, StoreError, UserError, get_system
from warp_phys.cli import main
from warp_phys.simulate import simulate
from warp_phys.store import (
    generate_store,
    is_complete,
    open_split,
    store_info,
    to_xarray,
)
from warp_phys.system import SPLITS

REPO = Path(__file__).resolve().parents[1]
SEED, CHUNK = 5, 3  # those of the session fixture `msd_store`


def test_round_trip_equals_simulate(msd_store):
    system = get_system("msd")
    for split in SPLITS:
        ds = open_split(msd_store, split)
        params, y0, y = ds["params"].values, ds["y0"].values, ds["y"].values
        lows, highs = np.array(list(system.ranges(split).values())).T
        assert ((params >= lows) & (params <= highs)).all(), split
        for lo in range(0, len(y), CHUNK):  # the chunks the store integrated
            want = simulate(
                system,
                torch.from_numpy(y0[lo : lo + CHUNK]),
                torch.from_numpy(params[lo : lo + CHUNK]),
                system.times(),
            )
            assert want.numpy().tobytes() == y[lo : lo + CHUNK].tobytes(), (split, lo)
        np.testing.assert_array_equal(y[:, 0], y0)


def test_each_split_opens_with_plain_xarray(msd_store, counts):
    system = get_system("msd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no consolidated-metadata fallback warning either
        for split in SPLITS:
            ds = xr.open_zarr(msd_store, group=split)
            assert ds["y"].dims == ("trajectory", "time", "state")
            assert ds["params"].dims == ("trajectory", "parameter")
            assert ds["y0"].dims == ("trajectory", "state")
            assert ds["y"].dtype == np.float64
            assert ds.sizes == {
                "trajectory": counts[split],
                "time": system.n_steps,
                "state": system.state_dim,
                "parameter": len(system.param_names),
            }
            assert list(ds["state"].values) == list(system.state)
            assert list(ds["parameter"].values) == list(system.param_names)
            np.testing.assert_array_equal(ds["time"].values, system.times().numpy())
            assert ds["y"].encoding["chunks"][0] == min(CHUNK, counts[split])
            a = ds.attrs
            assert a["system"] == "msd" and a["split"] == split and a["seed"] == SEED
            assert a["equations"] == list(system.equations) and a["latex"]
            assert a["ranges"] == {k: list(v) for k, v in system.ranges(split).items()}
            assert a["rtol"] > 0 and a["atol"] > 0 and a["method"]
            assert a["warp_phys_version"] == warp_phys.__version__
            assert a["counts"] == counts and a["chunk"] == CHUNK
            assert set(a["value_range"]) == set(system.state)
            float(ds["y"].sel(state="x").isel(trajectory=0, time=-1))  # label indexing works


@pytest.mark.parametrize("chunk, batch", [(8, None), (64, None), (8, 8), (8, 20), (3, 1)])
def test_same_seed_same_bytes_whatever_the_chunk_and_the_batch(
    msd_store, tmp_path, chunk, batch, counts, read_store, same_arrays
):
    """`msd_store` integrates each split in one batch; here one chunk or a few at a time."""
    path = tmp_path / "s.zarr"
    generate_store(
        get_system("msd"), path, counts=counts, seed=SEED, chunk=chunk, batch=batch,
        progress=False,
    )  # fmt: skip
    same_arrays(read_store(path), read_store(msd_store))


def test_the_integration_batch_is_whole_chunks_within_the_memory_bound(monkeypatch):
    system = get_system("lorenz63")  # 1001 saved times x 3 states: 24 KB per trajectory
    assert store.integration_batch(system, 256) == store.MAX_BATCH == 8192
    assert store.integration_batch(system, 256, 1000) == 768  # rounded down to whole chunks
    assert store.integration_batch(system, 256, 10) == 256  # never below one chunk
    per_trajectory = len(system.times()) * system.state_dim * 8
    monkeypatch.setattr(store, "BATCH_BYTES", 100 * per_trajectory + 1)
    assert store.integration_batch(system, 8) == 96  # 100 fit: 12 whole chunks of 8
    with pytest.raises(UserError, match="batch must be a positive"):
        generate_store(system, "unused.zarr", counts={"train": 1}, batch=0, progress=False)


def test_splits_and_seeds_give_different_draws(msd_store):
    train, val = (open_split(msd_store, s)["params"].values for s in ("train", "val"))
    assert not np.isin(val, train).any()
    other = store._sample(get_system("msd"), SEED + 1, "train", len(train), 0, len(train))[0]
    assert not np.isin(other, train).any()


def test_rerun_of_a_complete_store_is_a_noop(msd_store, counts):
    before = {p: p.stat().st_mtime_ns for p in msd_store.rglob("*")}
    report = generate_store(
        get_system("msd"), msd_store, counts=counts, seed=SEED, chunk=CHUNK, progress=False
    )
    assert report.already_complete and report.written == 0
    assert {p: p.stat().st_mtime_ns for p in msd_store.rglob("*")} == before


@pytest.mark.parametrize(
    ("ranges", "change", "match"),
    [
        ({}, {"seed": SEED + 1}, "seed: stored 5, asked 6"),
        ({}, {"chunk": 4}, "chunk: stored 3, asked 4"),
        ({}, {"counts": {"train": 3}}, "counts: stored"),
        ({"k": (5.0, 6.0)}, {}, "description.ranges_train"),
    ],
)
def test_other_arguments_on_an_existing_store_are_refused(msd_store, counts, ranges, change, match):
    kwargs = {"counts": counts, "seed": SEED, "chunk": CHUNK, "progress": False, **change}
    system = get_system("msd", train_ranges=ranges)
    with pytest.raises(
        StoreError,
        match=f"a complete store generated with other arguments.*{match}"
        ".*pick another --out, or delete",
    ):
        generate_store(system, msd_store, **kwargs)


def _interrupt_after(monkeypatch, calls: int) -> None:
    """Make the store's `simulate` raise KeyboardInterrupt on call number `calls`."""
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return simulate(*args, **kwargs)

    monkeypatch.setattr(store, "simulate", flaky)


def test_interrupted_run_resumes_to_the_same_bytes(
    msd_store, tmp_path, monkeypatch, counts, read_store, same_arrays
):
    path = tmp_path / "s.zarr"
    _interrupt_after(monkeypatch, calls=4)  # the probe, two chunks, then the interruption
    with pytest.raises(KeyboardInterrupt):
        generate_store(
            get_system("msd"), path, counts=counts, seed=SEED, chunk=CHUNK, batch=CHUNK,
            progress=False,
        )  # fmt: skip
    assert path.exists() and not is_complete(path)
    for opener in (
        lambda: open_split(path, "train"),
        lambda: store_info(path),
        lambda: to_xarray(path),
    ):
        with pytest.raises(
            StoreError,
            match=r"incomplete \(2/7 chunks written.*resume it with "
            r"`warp-phys generate msd --out",
        ):
            opener()
    with pytest.raises(StoreError, match="incomplete store generated with other arguments"):
        generate_store(get_system("msd"), path, counts=counts, seed=SEED + 1, chunk=CHUNK)
    monkeypatch.setattr(store, "simulate", simulate)
    report = generate_store(
        get_system("msd"), path, counts=counts, seed=SEED, chunk=CHUNK, progress=False
    )
    assert (report.skipped, report.written, report.already_complete) == (2, 5, False)
    same_arrays(read_store(path), read_store(msd_store))


def _chunks_done(path: Path) -> int:
    try:
        return int(zarr.open_group(path, mode="r")["_progress/train/done"][:].sum())
    except Exception:  # not created yet
        return 0


def test_resume_after_sigkill_equals_an_uninterrupted_run(
    tmp_path, capsys, read_store, same_arrays
):
    args = [
        "generate",
        "msd",
        "--n-train",
        "48",
        "--n-val",
        "2",
        "--n-test",
        "2",
        "--n-test-ood",
        "2",
        "--chunk",
        "2",
        "--batch",
        "2",
        "--seed",
        "3",
        "--quiet",
    ]
    killed, whole = tmp_path / "killed.zarr", tmp_path / "whole.zarr"
    log = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "warp_phys", *args, "--out", str(killed)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 120
        while _chunks_done(killed) < 1:
            assert proc.poll() is None, (
                f"generate exited early: {(tmp_path / 'stderr.txt').read_text()}"
            )
            assert time.monotonic() < deadline, "no chunk written within 120 s"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no cleanup handler runs
        proc.wait()
    assert proc.returncode == -9
    assert not is_complete(killed), "the run finished before the kill: give it more work"
    with pytest.raises(StoreError, match="incomplete.*resume it with `warp-phys generate msd"):
        open_split(killed, "train")

    assert main([*args, "--out", str(killed)]) == 0
    assert "resumed" in capsys.readouterr().out
    assert main([*args, "--out", str(whole)]) == 0
    same_arrays(read_store(killed), read_store(whole))


def test_divergence_names_the_trajectory_and_leaves_the_store_incomplete(tmp_path, test_systems):
    path = tmp_path / "s.zarr"
    system = test_systems["test_store_blow_up"]
    counts = {"train": 3, "test_ood": 2}
    with pytest.raises(DivergenceError, match=r"split 'test_ood'.*trajectory 0 \(a=.*t=0\.[0-9]+"):
        generate_store(system, path, counts=counts, seed=0, chunk=2, batch=2, progress=False)
    assert not is_complete(path)
    assert int(zarr.open_group(path)["_progress/train/done"][:].sum()) == 2  # train was fine
    # one batch for both splits: the error still names the split and its own trajectory index
    other = tmp_path / "t.zarr"
    with pytest.raises(DivergenceError, match=r"split 'test_ood'.*trajectory 0 \(a="):
        generate_store(system, other, counts=counts, seed=0, chunk=2, progress=False)
    assert int(zarr.open_group(other)["_progress/test_ood/done"][:].sum()) == 0
    with pytest.raises(StoreError, match="incomplete"):
        open_split(path, "train")


def test_wrong_shape_vector_field_writes_nothing(tmp_path, test_systems):
    with pytest.raises(UserError, match="shape"):
        generate_store(
            test_systems["test_store_wrong_shape"],
            tmp_path / "s.zarr",
            counts={"train": 2},
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"counts": {"train": 0}}, r"count of split 'train' must be a positive integer.*--n-train"),
        ({"counts": {"test_ood": -2}}, r"positive integer; got -2 \(set --n-test-ood"),
        ({"counts": {"train": 2.5}}, "positive integer"),
        ({"counts": {"training": 2}}, "unknown split 'training'"),
        ({"counts": {}}, "counts must map"),
        ({"chunk": 0}, "chunk must be a positive"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"rtol": 0.0}, "rtol must be a positive"),
        ({"method": "rk45"}, "unknown integration method"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path, kwargs, match):
    kwargs = {"counts": {"train": 2}, "progress": False, **kwargs}
    with pytest.raises(UserError, match=match):
        generate_store(get_system("sine"), tmp_path / "s.zarr", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_foreign_paths_are_never_written(tmp_path):
    (tmp_path / "file.txt").write_text("precious")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("precious")
    for target in (tmp_path / "file.txt", tmp_path / "dir"):
        with pytest.raises(StoreError, match="not a warp-phys store; refusing to write"):
            generate_store(get_system("sine"), target, counts={"train": 2}, progress=False)
    assert (
        (tmp_path / "file.txt").read_text()
        == (tmp_path / "dir" / "notes.txt").read_text()
        == "precious"
    )
    (tmp_path / "empty").mkdir()  # an empty directory is fine to use
    generate_store(get_system("sine"), tmp_path / "empty", counts={"train": 2}, progress=False)
    assert is_complete(tmp_path / "empty")


def test_opening_what_is_not_a_complete_store_raises(tmp_path, msd_store):
    with pytest.raises(StoreError, match="no store at .*warp-phys generate SYSTEM --out"):
        open_split(tmp_path / "missing.zarr", "train")
    (tmp_path / "other").mkdir()
    with pytest.raises(StoreError, match="not a warp-phys store"):
        open_split(tmp_path / "other", "train")
    path = tmp_path / "subset.zarr"
    generate_store(get_system("sine"), path, counts={"train": 2}, progress=False)
    with pytest.raises(StoreError, match="has no split 'val'; its splits are train"):
        open_split(path, "val")
    copy = tmp_path / "copy.zarr"  # a partial copy: one chunk file of y lost
    shutil.copytree(msd_store, copy)
    chunk_files = [p for p in (copy / "val" / "y" / "c").rglob("*") if p.is_file()]
    os.remove(chunk_files[0])
    with pytest.raises(StoreError, match=r"truncated: val/y has 0 of 1 chunk files"):
        open_split(copy, "val")
    (copy / "zarr.json").write_text('{"zarr_format": 3, "node_ty')  # cut short
    assert not is_complete(copy)
    with pytest.raises(StoreError, match="has damaged metadata .*restore a copy"):
        open_split(copy, "train")


def test_a_split_loads_as_tensors_and_batches(msd_store, counts):
    from warp_phys.data import load_dataset

    ds = open_split(msd_store, "train")
    data = load_dataset(msd_store)
    split = data.splits["train"]
    assert split.y.shape == (counts["train"], 256, 2) and split.y.dtype == torch.float32
    np.testing.assert_array_equal(split.y.numpy(), ds["y"].values.astype(np.float32))
    batches = [b["params"] for b in data.loader("train", batch_size=4, seed=1)]
    again = [b["params"] for b in data.loader("train", batch_size=4, seed=1)]
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))
    want = torch.from_numpy(split.params).sort(0).values
    assert torch.equal(torch.cat(batches).sort(0).values, want)


def test_to_xarray_and_store_info(msd_store, counts):
    tree = to_xarray(msd_store)
    assert set(tree.children) == set(SPLITS) and tree.attrs["complete"] is True
    info = store_info(msd_store)
    assert info["system"] == "msd" and info["state"] == ["x", "v"] and info["seed"] == SEED
    for split in SPLITS:
        y = tree[split]["y"].values
        assert info["splits"][split]["shape"] == [counts[split], 256, 2]
        got = info["splits"][split]["value_range"]
        assert got == {
            s: [float(y[..., i].min()), float(y[..., i].max())] for i, s in enumerate("xv")
        }


# -- observation noise --------------------------------------------------------------------------
def _noisy(path, counts, chunk, **kw):
    generate_store(
        get_system("msd"), path, counts=counts, seed=SEED, chunk=chunk, noise=0.05, progress=False,
        **kw,
    )  # fmt: skip
    return {s: open_split(path, s) for s in ("train", "test_ood")}


def test_noise_is_gaussian_at_the_asked_fraction_of_the_train_std(msd_store, tmp_path, counts):
    ds = _noisy(tmp_path / "n.zarr", counts, CHUNK)
    clean = open_split(msd_store, "train")["y"].values
    assert np.array_equal(ds["train"]["y"].values, clean)  # the clean data is untouched
    std = clean.reshape(-1, clean.shape[-1]).std(0)  # (S,)
    sigma = np.array(list(ds["train"].attrs["noise_std"].values()))
    assert np.allclose(sigma, 0.05 * std, rtol=1e-12)
    eps = (ds["train"]["obs"].values - clean) / sigma  # standard normal draws
    n = eps.size  # 10 x 256 x 2: the sample std is within 4/sqrt(2n) of 1
    assert abs(eps.std() - 1) < 4 / np.sqrt(2 * n) and abs(eps.mean()) < 4 / np.sqrt(n)
    assert ds["test_ood"].attrs["noise"] == 0.05


@pytest.mark.parametrize("chunk", [2, 64])
def test_same_seed_same_noise_bytes_whatever_the_chunk(tmp_path, counts, chunk):
    a = _noisy(tmp_path / "a.zarr", counts, CHUNK)
    b = _noisy(tmp_path / "b.zarr", counts, chunk)
    for split in a:
        assert a[split]["obs"].values.tobytes() == b[split]["obs"].values.tobytes()


def test_an_interrupted_noisy_store_resumes_to_the_same_bytes(tmp_path, counts, monkeypatch):
    want = _noisy(tmp_path / "want.zarr", counts, CHUNK)
    calls = {"n": 0}
    real = store._write_noise

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_write_noise", flaky)
    with pytest.raises(KeyboardInterrupt):
        _noisy(tmp_path / "got.zarr", counts, CHUNK)
    assert not is_complete(tmp_path / "got.zarr")
    monkeypatch.setattr(store, "_write_noise", real)
    got = _noisy(tmp_path / "got.zarr", counts, CHUNK)
    for split in want:
        assert want[split]["obs"].values.tobytes() == got[split]["obs"].values.tobytes()


@pytest.mark.parametrize("noise", [-0.1, float("nan"), 1.0, 2.5, True])
def test_bad_noise_is_refused_before_writing(tmp_path, counts, noise):
    with pytest.raises(UserError, match=r"must lie in \[0, 1\)"):
        generate_store(get_system("msd"), tmp_path / "x.zarr", counts=counts, noise=noise)
    assert not (tmp_path / "x.zarr").exists()


def test_asking_noise_of_a_clean_store_names_the_fix(msd_store):
    from warp_phys.data import check_store_noise

    with pytest.raises(UserError, match="generated without observation noise.*--noise 0.05"):
        check_store_noise(msd_store, 0.05)
    check_store_noise(msd_store, 0.0)  # asking for nothing is fine


def test_a_noisy_store_feeds_models_observations_and_keeps_the_truth(tmp_path, counts):
    from warp_phys.data import load_dataset

    _noisy(tmp_path / "n.zarr", counts, CHUNK)
    data = load_dataset(tmp_path / "n.zarr")
    split = data.splits["test"]
    assert data.noise == 0.05 and not torch.equal(split.y, split.truth)
    assert torch.equal(
        split.truth, torch.from_numpy(open_split(tmp_path / "n.zarr", "test")["y"].values).float()
    )
