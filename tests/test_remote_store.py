"""Stores on fsspec URLs: memory://, file:// and S3 (a local moto server): written, resumed,
opened by plain xarray, loaded for training, and the same bytes and fingerprint as on disk."""

from __future__ import annotations

import socket
import uuid

import numpy as np
import pytest
import xarray as xr
import zarr

from warp_phys.cli import main
from warp_phys.data import load_dataset
from warp_phys.integrity import fingerprint, verify_store
from warp_phys.location import RemotePath, parse
from warp_phys.store import generate_store, is_complete, open_split
from warp_phys.system import SPLITS, get_system

COUNTS = {"train": 10, "val": 2, "test": 2, "test_ood": 3}
SEED, CHUNK = 5, 3  # those of the session fixture `msd_store`


def _same_data(a, b) -> None:
    for split in SPLITS:
        x, y = open_split(a, split), open_split(b, split)
        for var in ("y", "params", "y0"):
            assert np.array_equal(x[var].values, y[var].values), (split, var)


def test_a_memory_store_is_written_read_and_trained_on(msd_store, tmp_path, capsys):
    url = f"memory://stores/{uuid.uuid4().hex}/msd.zarr"
    generate_store(get_system("msd"), url, counts=COUNTS, seed=SEED, chunk=CHUNK, progress=False)
    assert is_complete(url)
    _same_data(url, msd_store)
    assert fingerprint(url) == fingerprint(msd_store)  # a copy anywhere is the same data
    assert verify_store(url)["trajectories"] == sum(COUNTS.values())
    ds = xr.open_zarr(url, group="test_ood")  # plain xarray, from the URL
    assert ds["y"].shape == (3, 256, 2)
    data = load_dataset(url)
    assert isinstance(data.path, RemotePath) and str(data.path) == url
    args = ["train", "--data", url, "--model", "gru", "--out", str(tmp_path / "run")]
    args += ["-q", "--set", "train.steps=2", "--set", "data.context=100"]
    assert main(args) == 0
    assert f'"path": "{url}"' in (tmp_path / "run" / "run.json").read_text()


def test_a_file_url_is_the_local_path(msd_store, tmp_path):
    path = tmp_path / "f.zarr"
    assert parse(f"file://{path}") == path
    generate_store(
        get_system("msd"), f"file://{path}", counts=COUNTS, seed=SEED, chunk=CHUNK, progress=False
    )
    assert (path / "zarr.json").is_file()  # written where the path says, by the local store
    _same_data(path, msd_store)


def test_a_skeleton_cut_short_on_object_storage_is_written_again(msd_store, monkeypatch):
    """Object storage has no rename: the skeleton is written in place, and a run killed while
    writing it leaves the root metadata (with the arguments) without all the arrays."""
    import warp_phys.store as store

    url = f"memory://stores/{uuid.uuid4().hex}/cut.zarr"
    kwargs = dict(counts=COUNTS, seed=SEED, chunk=CHUNK, progress=False)
    real, calls = store._create_marks, {"n": 0}

    def dying(*args, **kw):  # killed after the marks of two splits
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(store, "_create_marks", dying)
    with pytest.raises(KeyboardInterrupt):
        generate_store(get_system("msd"), url, **kwargs)
    assert zarr.open_group(url, mode="r").attrs["warp_phys"]["arguments"]["seed"] == SEED
    assert not is_complete(url)
    monkeypatch.setattr(store, "_create_marks", real)
    report = generate_store(get_system("msd"), url, **kwargs)
    assert report.skipped == 0 and is_complete(url)
    _same_data(url, msd_store)


def test_a_url_whose_filesystem_is_missing_names_the_package(tmp_path, capsys):
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("gcsfs is installed here")
    assert main(["generate", "msd", "--out", "gs://bucket/x.zarr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install gcsfs" in err
    assert main(["train", "--data", "gs://bucket/x.zarr"]) == 2
    assert "pip install gcsfs" in capsys.readouterr().err


def test_an_unknown_url_protocol_is_one_line(capsys):
    assert main(["info", "nosuch://bucket/x.zarr"]) == 2
    assert "unknown URL protocol 'nosuch'" in capsys.readouterr().err


# -- S3, on a local moto server ---------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A bucket on a local moto S3 server; s3fs finds it through fsspec's configuration."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import fsspec.config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    conf = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "test", "secret": "test"}
    old = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = conf
    try:
        fs = parse("s3://warp-phys-test").fs
        fs.mkdir("warp-phys-test")
        yield "s3://warp-phys-test"
    finally:
        if old is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = old
        server.stop()


def test_an_s3_store_resumes_and_matches_the_local_one(s3, msd_store, monkeypatch, tmp_path):
    import warp_phys.store as store
    from warp_phys.simulate import simulate

    url = f"{s3}/msd.zarr"
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # the probe, two chunks, then an interruption
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return simulate(*args, **kwargs)

    monkeypatch.setattr(store, "simulate", flaky)
    kwargs = dict(counts=COUNTS, seed=SEED, chunk=CHUNK, batch=CHUNK, progress=False)
    with pytest.raises(KeyboardInterrupt):
        generate_store(get_system("msd"), url, **kwargs)
    assert not is_complete(url)
    monkeypatch.setattr(store, "simulate", simulate)
    report = generate_store(get_system("msd"), url, **kwargs)
    assert (report.skipped, report.written) == (2, 5)
    _same_data(url, msd_store)
    assert fingerprint(url) == fingerprint(msd_store)
    ds = xr.open_zarr(url, group="train")  # plain xarray on the s3:// URL
    assert np.array_equal(ds["y"].values, open_split(msd_store, "train")["y"].values)
    data = load_dataset(url)
    assert data.fingerprint == fingerprint(msd_store)
    args = ["train", "--data", url, "--model", "gru", "--out", str(tmp_path / "run")]
    args += ["-q", "--set", "train.steps=2", "--set", "data.context=100"]
    assert main(args) == 0
