"""Generation on dask: the bytes of one process whatever the workers and the chunk, a killed
worker and a killed client resumed by the same command, and the bad inputs of --dask."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from warp_phys.cli import main
from warp_phys.store import generate_store, is_complete
from warp_phys.system import get_system

distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[1]
COUNTS = {"train": 10, "val": 2, "test": 2, "test_ood": 3}
SEED, NOISE = 5, 0.05


@pytest.fixture(scope="module")
def client():
    """One 2-worker cluster of processes for the module (a cluster is slow to start)."""
    from warp_phys.cluster import connect

    with connect("local:2") as c:
        yield c


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("one") / "s.zarr"
    generate_store(
        get_system("msd"), path, counts=COUNTS, seed=SEED, chunk=3, noise=NOISE, progress=False
    )
    return path


def arrays(path, groups: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Every array of every group (the _progress marks included), by path in the store."""

    def walk(group, prefix=""):
        for name, member in group.members():
            if isinstance(member, zarr.Group):
                yield from walk(member, f"{prefix}{name}/")
            elif groups is None or prefix.split("/")[0] in groups:
                yield f"{prefix}{name}", member[...]

    return dict(walk(zarr.open_group(path, mode="r")))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key


@pytest.mark.parametrize("workers", [2, 4])
def test_dask_workers_write_the_bytes_of_one_process(client, one_process, tmp_path, workers):
    client.cluster.scale(workers)
    client.wait_for_workers(workers)
    path = tmp_path / "d.zarr"
    report = generate_store(
        get_system("msd"), path, counts=COUNTS, seed=SEED, chunk=3, noise=NOISE, progress=False,
        client=client,
    )  # fmt: skip
    assert report.written == 2 * 7 and is_complete(path)
    assert_same(arrays(path), arrays(one_process))  # every group, the marks included


def test_dask_bytes_do_not_depend_on_the_chunk(client, one_process, tmp_path):
    path = tmp_path / "c.zarr"
    generate_store(
        get_system("msd"), path, counts=COUNTS, seed=SEED, chunk=2, noise=NOISE, progress=False,
        client=client,
    )  # fmt: skip
    splits = ("train", "val", "test", "test_ood")  # _progress has one mark per chunk
    assert_same(arrays(path, splits), arrays(one_process, splits))


PLUGIN = '''
from warp_phys import Box, Param, System, register_system


@register_system("dask_plugin_decay")
class Decay(System):
    """x' = -k x."""

    state = ("x",)
    params = {"k": Param(1.0, train=(0.5, 1.5))}
    y0 = Box(low=(0.5,), high=(1.5,))
    n_steps = 16

    def vector_field(self, t, y, p):
        return -p.k.unsqueeze(-1) * y
'''


def test_workers_register_the_plugin_systems_of_the_client(client, tmp_path, monkeypatch):
    from warp_phys import registry
    from warp_phys.system import SYSTEMS

    monkeypatch.setattr(registry, "_plugin_folders", [])
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "decay.py").write_text(PLUGIN)
    registry.add_plugin_folder(folder)
    try:
        counts = {"train": 5, "val": 1, "test": 1, "test_ood": 1}
        system = get_system("dask_plugin_decay")
        generate_store(system, tmp_path / "d.zarr", counts=counts, chunk=2, progress=False,
                       client=client)  # fmt: skip
        generate_store(system, tmp_path / "o.zarr", counts=counts, chunk=2, progress=False)
        assert_same(arrays(tmp_path / "d.zarr"), arrays(tmp_path / "o.zarr"))
    finally:
        SYSTEMS.unregister("dask_plugin_decay")


def test_a_memory_store_is_refused_with_dask(client, tmp_path):
    with pytest.raises(ValueError, match="dask workers cannot reach"):
        generate_store(get_system("msd"), "memory://w/x.zarr", counts=COUNTS, client=client)


def _done(path: Path) -> int:
    try:
        return int(zarr.open_group(path, mode="r")["_progress/train/done"][:].sum())
    except Exception:  # not created yet
        return 0


def _wait(proc, path: Path, chunks: int, log: Path) -> None:
    deadline = time.monotonic() + 240
    while _done(path) < chunks:
        assert proc.poll() is None, f"generate exited early: {log.read_text()}"
        assert time.monotonic() < deadline, f"{chunks} chunks not written in 240 s"
        time.sleep(0.05)


def test_a_killed_worker_and_a_killed_client_resume_to_the_same_bytes(tmp_path):
    """kill -9 of one dask worker mid-run, then of the client (the command), then the same
    command again: the bytes of one uninterrupted process."""
    args = ["generate", "msd", "--n-train", "160", "--n-val", "2", "--n-test", "2"]
    args += ["--n-test-ood", "2", "--chunk", "2", "--batch", "2", "--seed", "3", "--quiet"]
    killed, whole = tmp_path / "killed.zarr", tmp_path / "whole.zarr"
    log = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "warp_phys", *args, "--out", str(killed), "--dask", "local:2"]
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)  # fmt: skip
    try:
        _wait(proc, killed, 2, log)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]  # fmt: skip
        assert workers, "no dask worker process found"
        os.kill(workers[-1].pid, signal.SIGKILL)
        done = _done(killed)
        _wait(proc, killed, done + 2, log)  # the others go on; the dead one is replaced
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client and what it started
        proc.wait()
    assert not is_complete(killed), "the run finished before the kill: give it more work"

    assert main([*args, "--out", str(killed), "--dask", "local:2"]) == 0
    assert main([*args, "--out", str(whole)]) == 0
    assert_same(arrays(killed), arrays(whole))


def test_an_unreachable_scheduler_is_one_line_within_the_timeout(tmp_path, capsys):
    start = time.monotonic()
    code = main(["generate", "msd", "--out", str(tmp_path / "x.zarr"), "--dask",
                 "tcp://127.0.0.1:9", "--dask-timeout", "1"])  # fmt: skip
    assert code == 2 and time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no dask scheduler answered at tcp://127.0.0.1:9 within 1 s" in err
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("spec", ["local:0", "local:x", ""])
def test_a_bad_dask_spec_names_the_form(tmp_path, capsys, spec):
    assert main(["generate", "msd", "--out", str(tmp_path / "x.zarr"), "--dask", spec]) == 2
    assert "--dask" in capsys.readouterr().err


def test_dask_missing_names_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails as if not installed
    assert main(["generate", "msd", "--out", str(tmp_path / "x.zarr"), "--dask", "local"]) == 2
    assert "pip install -e '.[dask]'" in capsys.readouterr().err
