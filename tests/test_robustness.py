"""Bad, corrupted and hostile input, and faults of the machine: one line and exit 2, every time.

Each case is named for what a careless colleague or a hostile file does. A traceback, an exit
code 0 on bad input, a silently wrong result, or code run from a file all fail the case. The
command line is driven in-process through `warp_phys.cli.main` (and once in a subprocess, to
show that a crafted checkpoint runs nothing in a fresh interpreter either).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from warp_phys.cli import main
from warp_phys.store import generate_store, is_complete
from warp_phys.system import SPLITS, get_system, system_names

torch.set_num_threads(1)

SINE_COUNTS = {"train": 8, "val": 4, "test": 4, "test_ood": 4}
TINY_TRAIN = [
    "--model", "gru", "--quiet",
    "--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.batch_size=4",
    "--set", "model.hidden=4", "--set", "data.context=6",
]  # fmt: skip


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc: int, err: str, *fragments: str) -> str:
    """Assert exit code 2 and one line on stderr without a traceback; return the line."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("warp-phys: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (to show that nothing changed)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def train_argv(store, out, *extra) -> list:
    return ["train", "--data", store, "--out", out, *TINY_TRAIN, *extra]


@pytest.fixture(scope="module")
def sine(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sine") / "sine.zarr"
    generate_store(get_system("sine"), path, counts=SINE_COUNTS, seed=3, chunk=4, progress=False)
    return path


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("noisy") / "msd.zarr"
    counts = {"train": 4, "val": 2, "test": 2, "test_ood": 2}
    generate_store(get_system("msd"), path, counts=counts, chunk=2, noise=0.1, progress=False)
    return path


@pytest.fixture(scope="module")
def finished_run(sine, tmp_path_factory) -> Path:
    """A finished tiny GRU run on the sine store (copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "gru"
    assert main([str(a) for a in train_argv(sine, out)]) == 0
    return out


def interrupted(sine, run_dir: Path, monkeypatch, capsys) -> Path:
    """A run killed during training (state training, last.pt at step 2 of 4)."""
    from warp_phys import optim

    real, calls = optim.Optimiser.step, {"n": 0}

    def dying(self, loss, progress):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, loss, progress)

    monkeypatch.setattr(optim.Optimiser, "step", dying)
    argv = train_argv(sine, run_dir, "--set", "train.steps=4")
    assert main([str(a) for a in argv]) == 130  # interrupted
    monkeypatch.setattr(optim.Optimiser, "step", real)
    capsys.readouterr()
    assert json.loads((run_dir / "run.json").read_text())["state"] == "training"
    return run_dir


def copy_run(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


# -- security: nothing in a file runs ---------------------------------------------------------
class Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def craft(path: Path, marker: Path, real: Path) -> None:
    """Replace a checkpoint by one holding the real weights plus a payload that runs code."""
    ckpt = torch.load(real, weights_only=True)
    ckpt["payload"] = Evil(marker)
    torch.save(ckpt, path)


@pytest.mark.parametrize("which", ["best.pt via evaluate", "last.pt via train --resume"])
def test_crafted_checkpoint_is_refused_and_runs_nothing(
    which, sine, finished_run, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "PWNED"
    if which.startswith("best"):
        run = copy_run(finished_run, tmp_path)
        craft(run / "best.pt", marker, run / "best.pt")
        argv = ["evaluate", run]
    else:
        run = interrupted(sine, tmp_path / "run", monkeypatch, capsys)
        craft(run / "last.pt", marker, run / "last.pt")
        argv = [*train_argv(sine, run, "--set", "train.steps=4"), "--resume"]
    before = (run / "run.json").read_bytes()
    rc, _, err = cli(capsys, *argv)
    one_line(rc, err, "asks to load code", "refused unread")
    assert not marker.exists()
    assert (run / "run.json").read_bytes() == before


def test_crafted_checkpoint_runs_nothing_in_a_fresh_process(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "PWNED"
    craft(run / "best.pt", marker, run / "best.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "warp_phys", "evaluate", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    one_line(proc.returncode, proc.stderr, "refused unread")
    assert not marker.exists()


def test_own_checkpoints_load_with_weights_only(finished_run):
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(finished_run / name, weights_only=True)
        assert isinstance(ckpt["model"], dict)
    last = torch.load(finished_run / "last.pt", weights_only=True)
    assert set(last) == {"model", "optimizer", "state", "gen", "batch_rng"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint", "is corrupt"),
        ([1, 2, 3], "not a warp-phys checkpoint"),
        (b"", "is corrupt"),
    ],
    ids=["garbage bytes", "a list, not a checkpoint", "empty file"],
)
def test_damaged_best_checkpoint_is_one_line(content, message, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    if isinstance(content, bytes):
        (run / "best.pt").write_bytes(content)
    else:
        torch.save(content, run / "best.pt")
    rc, _, err = cli(capsys, "evaluate", run)
    one_line(rc, err, message)


# -- runs that cannot lie ---------------------------------------------------------------------
def test_a_new_train_never_replaces_an_old_one_without_overwrite(sine, tmp_path, capsys):
    argv = ["train", "--data", sine, *TINY_TRAIN, "--set", f"out_dir={json.dumps(str(tmp_path))}"]
    assert cli(capsys, *argv)[0] == 0  # no --out: runs/out/run/gru under out_dir
    run = tmp_path / "run" / "gru"
    record = (run / "run.json").read_bytes()
    rc, out, _ = cli(capsys, *argv)  # the same settings and data: reported, not trained again
    assert rc == 0 and "already holds this run" in out and "gru test: forecast MSE" in out
    assert (run / "run.json").read_bytes() == record
    before = snapshot(run)
    rc, _, err = cli(capsys, *argv, "--set", "train.steps=3")
    one_line(rc, err, "already holds a finished run with other settings (train.steps = 2 in the run, 3 now)", "--overwrite")  # fmt: skip
    assert snapshot(run) == before
    rc, _, _ = cli(capsys, *argv, "--set", "train.steps=3", "--overwrite")
    assert rc == 0
    new = json.loads((run / "run.json").read_text())
    assert new["run_id"] != json.loads(record)["run_id"] and new["summary"]["steps"] == 3


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ("data.context=-5", "data.context = -5"),
        ("data.context=100", "context L=100 must be at least 1 and below the 16 steps"),
        ('train.loss="l1"', "train.loss = 'l1'"),
    ],
)
def test_a_failing_train_writes_nothing_into_an_existing_run(
    setting, fragment, sine, finished_run, tmp_path, capsys
):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    rc, _, err = cli(capsys, *train_argv(sine, run, "--set", setting), "--overwrite")
    one_line(rc, err, fragment)
    assert snapshot(run) == before


def test_resume_with_other_settings_names_the_difference(sine, tmp_path, capsys, monkeypatch):
    run = interrupted(sine, tmp_path / "run", monkeypatch, capsys)
    before = snapshot(run)
    rc, _, err = cli(capsys, *train_argv(sine, run, "--set", "train.steps=9"), "--resume")
    one_line(rc, err, "other settings (train.steps = 4 in the run, 9 now)", "--overwrite")
    assert snapshot(run) == before


def test_resume_on_another_store_is_refused(sine, tmp_path, capsys, monkeypatch):
    run = interrupted(sine, tmp_path / "run", monkeypatch, capsys)
    other = tmp_path / "other.zarr"
    generate_store(get_system("sine"), other, counts=SINE_COUNTS, seed=4, chunk=4, progress=False)
    argv = [*train_argv(other, run, "--set", "train.steps=4"), "--resume"]
    rc, _, err = cli(capsys, *argv)
    one_line(rc, err, "was trained on another dataset", "--overwrite")


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(
    sine, tmp_path, capsys, monkeypatch
):
    run = interrupted(sine, tmp_path / "cut", monkeypatch, capsys)
    (run / "last.pt.tmp").write_bytes(b"half a checkpoint")  # left by the kill
    assert cli(capsys, *train_argv(sine, run, "--set", "train.steps=4"), "--resume")[0] == 0
    assert not (run / "last.pt.tmp").exists()
    full = tmp_path / "full"
    assert cli(capsys, *train_argv(sine, full, "--set", "train.steps=4"))[0] == 0
    a, b = (torch.load(r / "last.pt", weights_only=True) for r in (run, full))
    assert a["state"]["step"] == b["state"]["step"] == 4
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_evaluate_refuses_or_marks_an_unfinished_run(sine, tmp_path, capsys, monkeypatch):
    run = interrupted(sine, tmp_path / "run", monkeypatch, capsys)
    rc, _, err = cli(capsys, "evaluate", run)
    one_line(rc, err, "has not finished training", "--resume", "--allow-unfinished")
    assert not (run / "metrics.json").exists()
    rc, _, err = cli(capsys, "evaluate", run, "--allow-unfinished")
    assert rc == 0 and "had not finished training" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["state"] == "training" and "unfinished" in metrics


def test_evaluate_refuses_a_failed_run(sine, tmp_path, capsys, monkeypatch):
    from warp_phys import train as train_mod

    monkeypatch.setattr(train_mod, "val_score", lambda *a, **k: float("inf"))
    rc, _, err = cli(capsys, *train_argv(sine, tmp_path / "run"))
    assert rc == 1 and "failed in training" in err and "Traceback" not in err
    monkeypatch.undo()
    rc, _, err = cli(capsys, "evaluate", tmp_path / "run")
    one_line(rc, err, "failed in training", "nothing to evaluate")


def test_evaluate_finds_the_recorded_store_from_any_folder(sine, tmp_path, capsys, monkeypatch):
    shutil.copytree(sine, tmp_path / "a" / "data.zarr")
    monkeypatch.chdir(tmp_path / "a")
    assert cli(capsys, *train_argv("data.zarr", "run"))[0] == 0  # a relative --data path
    record = json.loads(Path("run/run.json").read_text())
    assert Path(record["data"]["path"]).is_absolute()
    other = tmp_path / "b" / "data.zarr"  # the same relative path elsewhere holds another store
    generate_store(get_system("sine"), other, counts=SINE_COUNTS, seed=9, chunk=4, progress=False)
    monkeypatch.chdir(tmp_path / "b")
    rc, out, _ = cli(capsys, "evaluate", tmp_path / "a" / "run")
    assert rc == 0 and "gru test: forecast MSE" in out


def test_evaluate_refuses_a_regenerated_store_and_accepts_a_moved_one(
    sine, finished_run, tmp_path, capsys
):
    store = tmp_path / "sine.zarr"
    shutil.copytree(sine, store)
    run = tmp_path / "run"
    assert cli(capsys, *train_argv(store, run))[0] == 0
    moved = tmp_path / "moved.zarr"
    store.rename(moved)
    rc, _, err = cli(capsys, "evaluate", run)
    one_line(rc, err, "is not at", "--data")
    assert cli(capsys, "evaluate", run, "--data", moved)[0] == 0
    generate_store(get_system("sine"), store, counts=SINE_COUNTS, seed=8, chunk=4, progress=False)
    before = (run / "metrics.json").read_bytes()
    rc, _, err = cli(capsys, "evaluate", run)
    one_line(rc, err, "is not the one run", "fingerprint differs", "--data")
    assert (run / "metrics.json").read_bytes() == before


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda r: (r / "config.toml").write_bytes(bytes(range(256)) * 4), "not a text file"),
        (lambda r: (r / "config.toml").write_text("[train\nlr = "), "not valid TOML"),
        (lambda r: (r / "run.json").write_text("{not json"), "run.json is damaged"),
        (lambda r: (r / "run.json").write_bytes(b"\xff\xfe\x00garbage"), "run.json is damaged"),
        (lambda r: (r / "run.json").write_text('{"format": 2}'), "run.json is malformed"),
        (lambda r: (r / "run.json").write_text("[1, 2]"), "run.json is malformed"),
        (
            lambda r: (r / "run.json").write_text('{"label": "gru", "data_path": "x.zarr"}'),
            "written by an earlier warp-phys",
        ),
        (lambda r: (r / "run.json").unlink(), "is not a run directory"),
    ],
    ids=[
        "binary config.toml",
        "invalid config.toml",
        "run.json not JSON",
        "run.json not UTF-8",
        "run.json missing fields",
        "run.json a list",
        "run.json of an earlier version",
        "run.json missing",
    ],
)
def test_a_damaged_run_directory_is_one_line(damage, fragment, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    damage(run)
    rc, _, err = cli(capsys, "evaluate", run)
    one_line(rc, err, fragment)


def test_overwrite_replaces_a_damaged_run(sine, finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "run.json").write_text("{not json")
    (run / "notes.txt").write_text("mine")
    assert cli(capsys, *train_argv(sine, run), "--overwrite")[0] == 0
    assert (run / "notes.txt").read_text() == "mine"  # only what a run writes is replaced
    assert json.loads((run / "run.json").read_text())["state"] == "finished"


def test_a_folder_that_is_not_a_run_is_never_written_into(sine, tmp_path, capsys):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        rc, _, err = cli(capsys, *train_argv(sine, folder), *extra)
        one_line(rc, err, "is not a run directory")
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


# -- compare: no stale result passes for done -------------------------------------------------
TINY_COMPARE = """
name = "cmp"
[data]
system = "sine"
n_train = 8
n_val = 4
n_test = 4
n_test_ood = 4
chunk = 4
context = 6
[model]
hidden = 4
[train]
steps = 2
eval_every = 2
batch_size = 4
[models.gru]
kind = "gru"
[models.lstm]
kind = "lstm"
"""


def compare_argv(out_dir: Path, *extra) -> list:
    """A compare of a GRU and an LSTM on a tiny sine dataset, from a preset file in out_dir."""
    preset = out_dir / "tiny.toml"
    preset.write_text(TINY_COMPARE)
    return ["compare", preset, "--quiet", "--set", f"out_dir={json.dumps(str(out_dir))}", *extra]  # fmt: skip


def test_compare_never_takes_other_settings_for_done(tmp_path, capsys):
    assert cli(capsys, *compare_argv(tmp_path))[0] == 0

    def trained() -> dict:  # what the training produced (evaluation timings aside)
        results = json.loads((tmp_path / "cmp" / "results.json").read_text())["models"]
        return {k: (m["train_seconds"], m["splits"]["test"]["mse"]) for k, m in results.items()}

    first = trained()
    assert cli(capsys, *compare_argv(tmp_path))[0] == 0  # the same again: reused, not retrained
    assert trained() == first
    runs = {label: snapshot(tmp_path / "cmp" / label) for label in ("gru", "lstm")}
    for flags in ([], ["--resume"]):
        rc, _, err = cli(capsys, *compare_argv(tmp_path, "--set", "train.steps=3", *flags))
        one_line(rc, err, "train.steps = 2 in the run, 3 now", "--overwrite")
    assert runs == {label: snapshot(tmp_path / "cmp" / label) for label in ("gru", "lstm")}
    rc, _, _ = cli(capsys, *compare_argv(tmp_path, "--set", "train.steps=3", "--overwrite"))
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert rc == 0 and {m["train_steps"] for m in results["models"].values()} == {3}


def test_compare_resume_continues_an_unfinished_model_and_ignores_its_stale_metrics(
    tmp_path, capsys, monkeypatch
):
    from warp_phys import optim

    real, calls = optim.Optimiser.step, {"n": 0}

    def dying(self, loss, progress):  # the second model dies at its first step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, loss, progress)

    monkeypatch.setattr(optim.Optimiser, "step", dying)
    assert cli(capsys, *compare_argv(tmp_path))[0] == 130
    monkeypatch.undo()
    lstm = tmp_path / "cmp" / "lstm"
    assert json.loads((lstm / "run.json").read_text())["state"] == "training"
    (lstm / "metrics.json").write_text(json.dumps({"label": "lstm", "splits": {"test": 1e-9}}))
    assert cli(capsys, *compare_argv(tmp_path, "--resume"))[0] == 0
    record = json.loads((lstm / "run.json").read_text())
    metrics = json.loads((lstm / "metrics.json").read_text())
    assert record["state"] == "finished" and metrics["run_id"] == record["run_id"]
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert results["models"]["lstm"]["train_steps"] == 2


def test_set_of_one_model_keeps_the_other_default_models():
    from warp_phys.cli import _default_models
    from warp_phys.compare import default_models
    from warp_phys.config import load_config

    cfg = load_config(None, ["data.system=msd", 'models.gru.kind="lstm"'], base_models=_default_models)  # fmt: skip
    assert set(cfg.models) == set(default_models(get_system("msd")))
    assert cfg.models["gru"]["kind"] == "lstm"
    assert cfg.models["warp"] == default_models(get_system("msd"))["warp"]
    cfg = load_config("msd_small", ["models.gru.hidden=8"], base_models=_default_models)
    assert set(cfg.models) == {"warp", "warp_phys", "gru", "lstm"}  # the preset's own models


# -- data that is what it says ----------------------------------------------------------------
def test_a_missing_data_path_is_an_error_and_generates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli(capsys, *train_argv("missing.zarr", "run"))
    one_line(rc, err, "no store at missing.zarr", "warp-phys generate")
    assert sorted(os.listdir(tmp_path)) == []


def test_paths_with_quotes_and_backslashes_reach_the_config_intact(sine, tmp_path, capsys):
    odd = tmp_path / 'a "quoted" \\ dir,\tünï'
    shutil.copytree(sine, odd / "s.zarr")
    run = odd / "run"
    assert cli(capsys, *train_argv(odd / "s.zarr", run))[0] == 0
    from warp_phys.config import load_config

    assert load_config(str(run / "config.toml")).data.path == str(odd / "s.zarr")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["msd_small"], "data.system is 'msd' but the store"),
        (["--set", "data.system=pendulum"], "data.system is 'pendulum' but the store"),
        (["pendulum"], "data.system is 'pendulum' but the store"),
    ],
    ids=["preset naming msd", "--set data.system", "a bare system name"],
)
def test_a_system_label_other_than_the_stores_is_an_error(argv, fragment, sine, tmp_path, capsys):
    preset = [a for a in argv if not a.startswith("--") and "=" not in a]
    sets = [a for a in argv if a not in preset]
    rc, _, err = cli(capsys, "train", *preset, "--data", sine, "--out", tmp_path / "r", *TINY_TRAIN, *sets)  # fmt: skip
    one_line(rc, err, fragment, "'sine' trajectories")
    assert not (tmp_path / "r").exists()


def relabel(path: Path, name: str, *, everywhere: bool = True) -> None:
    root = zarr.open_group(path, mode="r+")
    for split in SPLITS:
        root[split].attrs["system"] = name
    if everywhere:
        meta = root.attrs["warp_phys"]
        meta["arguments"]["system"] = name
        meta["arguments"]["description"]["system"] = name
        root.attrs.update({"warp_phys": meta, "system": name})
    zarr.consolidate_metadata(path)


def set_values(var: str, index, value):
    def damage(path: Path) -> None:
        zarr.open_group(path, mode="r+")["train"][var][index] = value

    return damage


def chunk_file(path: Path, var: str = "y") -> Path:
    return sorted(p for p in (path / "train" / var / "c").rglob("*") if p.is_file())[1]


def flip_byte(path: Path) -> None:
    f = chunk_file(path)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    f = chunk_file(path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def edit_shape(path: Path) -> None:
    """Shorten train/y to 100 steps in its own metadata and in the consolidated copy."""
    for f, key in ((path / "train" / "y" / "zarr.json", None), (path / "zarr.json", "train/y")):
        meta = json.loads(f.read_text())
        node = meta if key is None else meta["consolidated_metadata"]["metadata"][key]
        node["shape"] = [node["shape"][0], 100, node["shape"][2]]
        f.write_text(json.dumps(meta))


CORRUPTIONS = {  # name: (damage of a copy of the msd store, fragment of the error line)
    "NaN in a train trajectory": (
        set_values("y", (1, 5, 0), np.nan),
        "train/y of trajectory 1 is not finite",
    ),  # fmt: skip
    "inf in y": (set_values("y", (2, 7, 1), np.inf), "train/y of trajectory 2 is not finite"),
    "one flipped exponent bit (2.25e307)": (
        set_values("y", (3, 10, 1), 2.25e307),
        "v = 2.25e+307 at step 10, outside the range",
    ),  # fmt: skip
    "NaN in params": (
        set_values("params", (2, 0), np.nan),
        "train/params of trajectory 2 is not finite",
    ),  # fmt: skip
    "negative mass": (
        set_values("params", (0, 0), -0.03),
        "has m = -0.03, but system 'msd' declares m > 0",
    ),  # fmt: skip
    "parameter outside its range": (
        set_values("params", (4, 1), 100.0),
        "has k = 100, outside its declared range [4, 16]",
    ),  # fmt: skip
    "y0 edited": (set_values("y0", (0, 0), 2.0), "does not start at its y0"),
    "flipped byte in a chunk": (flip_byte, "checksum do not match"),
    "truncated chunk": (truncate, "is damaged: reading"),
    "garbage chunk": (lambda p: chunk_file(p).write_bytes(b"garbage"), "is damaged: reading"),
    "missing chunk": (lambda p: chunk_file(p).unlink(), "is truncated"),
    "edited array shape": (
        edit_shape,
        "train/y has shape (10, 100, 2) but the store declares (10, 256, 2)",
    ),  # fmt: skip
    "relabelled msd_zero": (lambda p: relabel(p, "msd_zero"), "says system 'msd_zero' but its y0"),
    "relabelled split only": (
        lambda p: relabel(p, "msd_zero", everywhere=False),
        "names more than one system",
    ),  # fmt: skip
    "damaged root metadata": (
        lambda p: (p / "zarr.json").write_bytes(b"\x00\x01binary"),
        "damaged metadata",
    ),  # fmt: skip
}


# what plain `info` finds without reading data
METADATA = {
    "missing chunk", "edited array shape", "relabelled msd_zero", "relabelled split only",
    "damaged root metadata",
}  # fmt: skip


@pytest.mark.parametrize(
    ("verb", "case"),
    [(verb, case) for verb in ("info --verify", "train") for case in CORRUPTIONS]
    + [("info", case) for case in CORRUPTIONS if case in METADATA],  # plain info reads no data
)
def test_a_corrupted_store_is_one_line_never_a_plausible_result(
    case, verb, msd_store, tmp_path, capsys
):
    damage, fragment = CORRUPTIONS[case]
    path = tmp_path / "msd.zarr"
    shutil.copytree(msd_store, path)
    damage(path)
    if verb == "train":
        argv = ["train", "--data", path, "--out", tmp_path / "r", *TINY_TRAIN]
        argv[argv.index("data.context=6")] = "data.context=100"
    else:
        argv = ["info", path, *verb.split()[1:]]
    rc, out, err = cli(capsys, *argv)
    one_line(rc, err, fragment)
    assert not (tmp_path / "r").exists()


def test_a_rerun_of_generate_verifies_a_complete_store(msd_store, tmp_path, capsys):
    from warp_phys.store import store_info

    path = tmp_path / "msd.zarr"
    shutil.copytree(msd_store, path)
    info = store_info(path)
    sizes = [a for s, v in info["splits"].items() for a in (f"--n-{s.replace('_', '-')}", v["shape"][0])]  # fmt: skip
    argv = ["generate", "msd", "--out", path, *sizes, "--seed", info["seed"], "--chunk", info["chunk"], "-q"]  # fmt: skip
    rc, out, _ = cli(capsys, *argv)
    assert rc == 0 and "(verified); nothing to do" in out
    flip_byte(path)
    rc, _, err = cli(capsys, *argv)
    one_line(rc, err, "checksum do not match")


@pytest.mark.parametrize("var", ["obs"])
def test_non_finite_noisy_observations_are_refused(var, noisy, tmp_path, capsys):
    path = tmp_path / "noisy.zarr"
    shutil.copytree(noisy, path)
    set_values(var, (1, 3, 0), np.nan)(path)
    rc, _, err = cli(capsys, "info", path, "--verify")
    one_line(rc, err, "train/obs of trajectory 1 is not finite")


def test_info_verify_passes_a_healthy_store_and_a_format_1_store(
    msd_store, sine, tmp_path, capsys, monkeypatch, read_store, same_arrays
):
    rc, out, _ = cli(capsys, "info", msd_store, "--verify")
    assert rc == 0 and "verified: 28 arrays, 17 trajectories read" in out
    assert "CRC-32C checksum matched" in out
    import warp_phys.store as store

    def format_1_array(group, name, data=None, *, shape=None, dtype="f8", dims, chunks=None, fill=np.nan):  # fmt: skip
        shape = data.shape if data is not None else shape
        kwargs = {"fill_value": fill} if dtype is not str else {}
        arr = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks or shape, dimension_names=dims, **kwargs)  # fmt: skip
        if data is not None:
            arr[...] = data
        return arr

    monkeypatch.setattr(store, "_array", format_1_array)  # zstd only, as before format 2
    monkeypatch.setattr(store, "FORMAT", 1)
    old = tmp_path / "old.zarr"
    generate_store(get_system("sine"), old, counts=SINE_COUNTS, seed=3, chunk=4, progress=False)
    monkeypatch.undo()
    rc, out, _ = cli(capsys, "info", old, "--verify")
    assert rc == 0 and "no checksums to check (store format 1" in out
    same_arrays(read_store(old), read_store(sine))  # the same values as format 2
    assert cli(capsys, *train_argv(old, tmp_path / "r"))[0] == 0  # still trains


# -- every accepted value means what it says ---------------------------------------------------
BAD_SETTINGS = {  # --set value: fragment of the error line
    'train.loss="l1"': "train.loss = 'l1' is not allowed: it must be one of mse, nll",
    'train.loss="nll"': "needs a root that predicts a std",  # a GRU predicts none
    "train.max_seconds=nan": "train.max_seconds = nan",
    "train.max_seconds=-1": "train.max_seconds = -1.0",
    "train.batch_size=0": "train.batch_size = 0 is not allowed: it must be an integer >= 1",
    "train.eval_every=0": "train.eval_every = 0",
    "train.lr=-0.001": "train.lr = -0.001 is not allowed: it must be a finite number in (0, 1]",
    "train.lr=nan": "train.lr = nan",
    "train.lr=10": "train.lr = 10.0",
    "train.steps=0": "train.steps = 0",
    "train.teacher_prob_start=1.5": "train.teacher_prob_start = 1.5",
    "train.grad_clip=0": "train.grad_clip = 0.0",
    'train.optimizer="sgd"': "one of adam, paper",
    'train.device="tpu"': "cpu, cuda or cuda:<index>",
    "train.seed=-1": "train.seed = -1",
    'model.kind="mlp"': "model.kind = 'mlp' is not allowed: it must be one of warp, gru, lstm",
    'model.transition="rotor"': "model.transition = 'rotor'",
    'model.init_state="zeros"': "model.init_state = 'zeros'",
    'model.precision="fp8"': "model.precision = 'fp8' is not allowed: it must be one of auto, fp32",
    'model.scan_method="magic"': "model.scan_method = 'magic'",
    "model.hidden=0": "model.hidden = 0",
    "model.prefix_chunk=-1": 'model.prefix_chunk = -1 is not allowed: it must be an integer >= 0 (0 = off) or "auto"',
    'model.prefix_chunk="often"': "model.prefix_chunk = 'often'",
    "model.prior_options=3": "model.prior_options must be a table of options",
    "models=3": "[models] must be a table of model tables",
    "models.gru=3": "[models.gru] must be a table",
    'models.gru.kind="mlp"': "models.gru.kind = 'mlp'",
    "model.train={lr=-1.0}": "model.train.lr = -1.0",
    "data.context=-5": "data.context = -5",
    "data.noise=1.5": "data.noise = 1.5",
    "data.n_train=0": "data.n_train = 0",
    'name="../x"': "must be a plain name",
    "train.lrr=1": "unknown config key train.lrr",
}


@pytest.mark.parametrize("setting", list(BAD_SETTINGS))
def test_a_value_outside_its_range_is_one_line(setting, sine, tmp_path, capsys):
    rc, _, err = cli(capsys, *train_argv(sine, tmp_path / "r", "--set", setting))
    one_line(rc, err, BAD_SETTINGS[setting])
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "preset",
    ["models = 3\n", "[model]\nprior_options = 3\n", "[train]\nloss = 'l1'\n", "[train\n"],
    ids=["models = 3", "prior_options = 3", "loss l1", "invalid TOML"],
)
def test_a_bad_preset_file_is_one_line(preset, tmp_path, capsys):
    path = tmp_path / "mine.toml"
    path.write_text(preset)
    rc, _, err = cli(capsys, "compare", path, "--quiet")
    one_line(rc, err)
    assert not (tmp_path / "runs").exists()


BAD_GENERATE = {  # name: (arguments after `generate msd --out OUT -q`, fragment)
    "rtol 1e6": (["--rtol", "1e6"], "rtol=1e+06 is too loose"),
    "atol -1e-8 read as a value": (
        ["--atol", "-1e-8"],
        "atol must be a positive finite number; got -1e-08",
    ),  # fmt: skip
    "rtol -.5": (["--rtol", "-.5"], "rtol must be a positive"),
    "negative mass range": (["--range", "m=-0.01,0.04"], "'m' must stay above 0"),
    "negative ood mass range": (["--ood-range", "m=-1,1"], "'m' must stay above 0"),
    "huge count": (["--n-train", "100000000000"], "would need about"),
    "noise 1": (["--noise", "1"], "must lie in [0, 1)"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_bad_generate_arguments_are_one_line(case, tmp_path, capsys):
    args, fragment = BAD_GENERATE[case]
    rc, _, err = cli(capsys, "generate", "msd", "--out", tmp_path / "o.zarr", "-q", *args)
    one_line(rc, err, fragment)
    assert os.listdir(tmp_path) == []


# -- faults of the machine --------------------------------------------------------------------
SMALL = ["--n-train", "6", "--n-val", "2", "--n-test", "2", "--n-test-ood", "2", "--chunk", "2", "-q"]  # fmt: skip


def failing_writes(monkeypatch, code: int, after: int = 0):
    """Make zarr's file writes fail with `code` (ENOSPC, EROFS, ...) after `after` writes."""
    import zarr.storage._local as local

    real, calls = local._put, {"n": 0}

    def put(path, value, exclusive=False):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(code, os.strerror(code), str(path))
        return real(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_a_disk_fault_in_generate_is_one_line_and_the_store_resumes(
    code, tmp_path, capsys, monkeypatch, read_store, same_arrays
):
    out = tmp_path / "s.zarr"
    failing_writes(monkeypatch, code, after=60)  # the skeleton and a few chunks, then full
    rc, _, err = cli(capsys, "generate", "sine", "--out", out, *SMALL)
    one_line(rc, err, os.strerror(code), "cannot write")
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.lock"))
    assert cli(capsys, "generate", "sine", "--out", out, *SMALL)[0] == 0
    whole = tmp_path / "whole.zarr"
    assert cli(capsys, "generate", "sine", "--out", whole, *SMALL)[0] == 0
    same_arrays(read_store(out), read_store(whole))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_disk_fault_in_train_is_one_line_and_leaves_no_temporary_file(
    code, sine, tmp_path, capsys, monkeypatch
):
    import warp_phys.atomic as atomic

    real = atomic.os.fsync

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    run = tmp_path / "run"
    rc, _, err = cli(capsys, *train_argv(sine, run))
    line = one_line(rc, err, "cannot write", os.strerror(code))
    assert ("--resume" in line) == (code == errno.ENOSPC)  # a write cut short can be resumed
    monkeypatch.setattr(atomic.os, "fsync", real)
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_read_only_folder_is_one_line(sine, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the fault is simulated above")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        rc, _, err = cli(capsys, "generate", "sine", "--out", folder / "s.zarr", *SMALL)
        one_line(rc, err, "Permission denied")
        rc, _, err = cli(capsys, *train_argv(sine, folder / "run"))
        one_line(rc, err, "Permission denied")
    finally:
        folder.chmod(0o755)


def test_a_second_writer_of_the_same_store_is_refused_while_the_first_holds_it(tmp_path, capsys):
    out = tmp_path / "s.zarr"
    fd = os.open(tmp_path / ".s.zarr.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer, as far as generate can tell
    try:
        rc, _, err = cli(capsys, "generate", "sine", "--out", out, *SMALL)
        one_line(rc, err, "another warp-phys process is writing", "run this command again")
    finally:
        os.close(fd)
    assert not out.exists()
    assert cli(capsys, "generate", "sine", "--out", out, *SMALL)[0] == 0


def test_two_generates_of_the_same_store_at_once_leave_one_good_store(tmp_path):
    out = tmp_path / "s.zarr"
    argv = [sys.executable, "-m", "warp_phys", "generate", "msd", "--out", str(out)]
    argv += ["--n-train", "600", "--n-val", "2", "--n-test", "2", "--n-test-ood", "2", "-q"]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for rc, err in results:
        assert "Traceback" not in err and rc in (0, 2), err
        if rc == 2:
            assert "another warp-phys process is writing" in err
    assert any(rc == 0 for rc, _ in results)
    from warp_phys.integrity import verify_store

    assert verify_store(out)["trajectories"] == 606


def test_a_skeleton_left_by_a_kill_is_removed_by_the_next_generate(tmp_path, capsys):
    stale = tmp_path / ".s.zarr.partial-deadbeef"
    stale.mkdir()
    (stale / "zarr.json").write_text("{}")
    assert cli(capsys, "generate", "sine", "--out", tmp_path / "s.zarr", *SMALL)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["s.zarr"]


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile.txt").write_text("x")
    rc, _, err = cli(capsys, "generate", "sine", "--out", tmp_path / "afile.txt" / "sub.zarr", *SMALL)  # fmt: skip
    one_line(rc, err, "afile.txt is a file", "choose another --out")
    rc, _, err = cli(capsys, "train", "--data", tmp_path / "afile.txt" / "s.zarr", *TINY_TRAIN)
    one_line(rc, err, "no store at")


def test_a_runs_folder_in_the_working_directory_hides_no_preset(tmp_path, capsys, monkeypatch):
    from warp_phys.config import load_config, preset_path, presets_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "out").mkdir(parents=True)
    assert preset_path("msd_small") == presets_dir() / "msd_small.toml"
    assert load_config("msd_small").name == "msd_small"
    (tmp_path / "runs" / "mine.toml").write_text('name = "mine"\n[train]\nsteps = 7\n')
    assert load_config("runs/mine.toml").train.steps == 7  # a preset elsewhere, by path
    rc, _, err = cli(capsys, "train", "msd_small", "--set", "train.lrr=1")
    one_line(rc, err, "unknown config key train.lrr")


# -- determinism: the bytes of a store do not depend on how it was drawn -----------------------
@pytest.mark.parametrize("name", system_names())
def test_rows_drawn_alone_are_the_rows_of_the_whole_draw(name):
    from warp_phys.store import _sample

    system = get_system(name)
    for split in SPLITS:
        n = 37
        rng = np.random.default_rng(np.random.SeedSequence([11, SPLITS.index(split)]))
        params, y0 = system.sample(rng, n, split)
        for lo, hi in ((0, n), (0, 1), (5, 17), (36, 37)):
            p, y = _sample(system, 11, split, n, lo, hi)
            assert p.tobytes() == params[lo:hi].tobytes(), (split, lo, hi)
            assert y.tobytes() == np.ascontiguousarray(y0[lo:hi]).tobytes(), (split, lo, hi)


def test_parameters_are_drawn_by_blocks_never_all_at_once(
    tmp_path, monkeypatch, counts, read_store, same_arrays
):
    import warp_phys.store as store

    whole = tmp_path / "whole.zarr"
    generate_store(get_system("msd_zero"), whole, counts=counts, chunk=3, progress=False)
    monkeypatch.setattr(store, "_SMALL_CHUNK", 4)  # blocks of 4 trajectories
    monkeypatch.setattr(
        type(get_system("msd_zero")), "sample", lambda *a: pytest.fail("drew a whole split")
    )
    blocks = tmp_path / "blocks.zarr"
    generate_store(get_system("msd_zero"), blocks, counts=counts, chunk=3, progress=False)
    same_arrays(read_store(whole), read_store(blocks))
    assert is_complete(blocks)
