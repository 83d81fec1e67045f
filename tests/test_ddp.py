"""Training on several processes (torch.distributed, gloo on the CPU): the loss curve of one
process on the same global batch, rank 0 alone writes, resume with another number of
processes, and the bad inputs of torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from warp_phys.cli import main
from warp_phys.config import load_config
from warp_phys.distributed import Group, check_world, share
from warp_phys.errors import RankError, UserError
from warp_phys.run import prepare_data

REPO = Path(__file__).resolve().parents[1]
# both phases in 20 steps: teacher-forced, then autoregressive with random teacher forcing
SETTINGS = [
    "data.system=sine",
    "data.n_train=32",
    "data.n_val=8",
    "data.n_test=8",
    "data.n_test_ood=8",
    "data.context=6",
    "data.chunk=16",
    "train.steps=20",
    "train.eval_every=5",
    "train.batch_size=8",  # the global batch: 4 trajectories per process on 2
    "train.max_seconds=0",  # schedules by steps only: the same on any machine
    "train.teacher_forced_fraction=0.4",
    "model.prior_options={width=8, depth=1}",
]
LOSS_RTOL = 1e-5  # the target: the sums of a batch run in another order, nothing else


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    cfg = load_config(None, SETTINGS, values={"out_dir": str(out)})
    return Path(prepare_data(cfg, progress=False).path)


def _argv(store: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [a for s in SETTINGS if not s.startswith("data.n_") for a in ("--set", s)]
    return ["train", "--data", str(store), "--model", "warp", "--out", str(run_dir)] + [
        "-q",
        *sets,
        *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, argv: list[str], log: str, stop_at: int) -> None:
    """One process of a torchrun-like launch (the environment torchrun sets), then `main`."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    run_dir = os.path.abspath(argv[argv.index("--out") + 1])
    writes: list[str] = []
    if rank > 0:  # record every write of this process under the run directory

        def audit(event: str, args: tuple) -> None:
            if event == "open" and str(args[0]).startswith(run_dir):
                mode, flags = args[1] or "", args[2] or 0
                if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR):
                    writes.append(f"{event} {args[0]}")
            elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree"):
                if str(args[0]).startswith(run_dir):
                    writes.append(f"{event} {args[0]}")

        sys.addaudithook(audit)
    if stop_at:  # an interruption of every process at the same step (a kill of the job)
        from warp_phys import optim

        real, calls = optim.Optimiser.step, {"n": 0}

        def dying(self, loss, progress):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            return real(self, loss, progress)

        optim.Optimiser.step = dying
    code = main(argv)
    Path(log, f"rank{rank}.json").write_text(json.dumps({"code": code, "writes": writes}))


def _launch(world: int, argv: list[str], log: Path, stop_at: int = 0) -> list[dict]:
    log.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank, args=(world, _free_port(), argv, str(log), stop_at), nprocs=world)
    return [json.loads((log / f"rank{r}.json").read_text()) for r in range(world)]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((run_dir / "history.json").read_text())
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def test_two_gloo_processes_give_the_loss_curve_of_one_and_only_rank_0_writes(store, tmp_path):
    assert main(_argv(store, tmp_path / "one")) == 0
    ranks = _launch(2, _argv(store, tmp_path / "two"), tmp_path / "log")
    assert [r["code"] for r in ranks] == [0, 0]
    assert ranks[1]["writes"] == [], "a process other than rank 0 wrote into the run"
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 21))
    for (step, a), (_, b) in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL), f"step {step}"
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2
    names = {p.name for p in (tmp_path / "two").iterdir()}
    assert names == {p.name for p in (tmp_path / "one").iterdir()}


def test_a_run_of_two_processes_resumes_in_one_to_the_same_curve(store, tmp_path):
    assert main(_argv(store, tmp_path / "one")) == 0
    # killed at the 13th step, after the checkpoint of step 10
    ranks = _launch(2, _argv(store, tmp_path / "run"), tmp_path / "log", stop_at=13)
    assert [r["code"] for r in ranks] == [130, 130]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["state"] == "training"
    assert main(_argv(store, tmp_path / "run", "--resume")) == 0  # one process now
    one, resumed = _losses(tmp_path / "one"), _losses(tmp_path / "run")
    assert [s for s, _ in resumed] == list(range(1, 21))
    for (step, a), (_, b) in zip(one, resumed, strict=True):
        assert b == pytest.approx(a, rel=LOSS_RTOL), f"step {step}"


def test_the_batch_rule_shares_every_trajectory_once():
    for n in (4, 5, 7, 64):
        for world in (1, 2, 3, 4):
            parts = [share(n, Group(rank=r, world=world)) for r in range(world)]
            assert sum((list(range(n))[p] for p in parts), []) == list(range(n))
            assert all(p.stop > p.start for p in parts)


@pytest.mark.parametrize(
    "n_train, batch, match",
    [
        (3, 8, "torchrun started 4 processes but the training split has 3 trajectories.*"
         "--nproc-per-node 3"),
        (32, 2, "train.batch_size = 2 is smaller than the 4 processes.*at least 4"),
    ],
)  # fmt: skip
def test_more_processes_than_trajectories_is_one_line_naming_the_fix(n_train, batch, match):
    with pytest.raises(UserError, match=match):
        check_world(4, n_train, batch)


def test_torchrun_with_more_processes_than_trajectories_exits_2_with_one_line(tmp_path):
    """End to end, as a user types it: torchrun, two processes, one training trajectory."""
    data = tmp_path / "one.zarr"
    assert main(["generate", "sine", "--out", str(data), "--n-train", "1", "--n-val", "2",
                 "--n-test", "2", "--n-test-ood", "2", "--quiet"]) == 0  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(_free_port()), "-m", "warp_phys"]
    cmd += _argv(data, tmp_path / "run")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = [x for x in done.stderr.splitlines() if x.startswith("warp-phys: error:")]
    assert len(lines) == 1, done.stderr  # from rank 0 only
    assert "torchrun started 2 processes but the training split has 1 trajectories" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing written


def test_other_verbs_under_torchrun_name_the_fix(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["info", "nowhere.zarr"]) == 2
    assert "runs in one process; run it without torchrun" in capsys.readouterr().err
    assert main(["generate", "msd", "--out", "x.zarr"]) == 2
    assert "--dask" in capsys.readouterr().err


@pytest.mark.parametrize(
    "rank, error, shown",
    [("0", UserError, True), ("1", UserError, False), ("1", RankError, True)],
)
def test_rank_0_reports_what_every_process_meets_another_only_its_own(
    monkeypatch, capsys, rank, error, shown
):
    import warp_phys.cli as cli

    def failing(args):
        raise error("the store is not there")

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli, "cmd_info", failing)
    assert main(["info", "x.zarr"]) == 2
    assert ("the store is not there" in capsys.readouterr().err) == shown
