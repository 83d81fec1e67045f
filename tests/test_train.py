"""Training runs: run directory, resume after an interruption, NaN skip and stop, bad input."""

import json

import pytest
import torch

from warp_phys.config import load_config
from warp_phys.errors import UserError
from warp_phys.run import prepare_data, train_and_evaluate

torch.set_num_threads(1)  # tiny models: one thread is faster than two busy ones

TINY = [
    "data.system=sine",
    "data.n_train=32",
    "data.n_val=8",
    "data.n_test=8",
    "data.n_test_ood=8",
    "data.context=6",
    "data.chunk=16",
    "train.steps=8",
    "train.eval_every=2",
    "train.batch_size=8",
    "model.prior_options={width=8, depth=1}",
    "model.hidden=8",
]


@pytest.fixture(scope="module")
def sine_store(tmp_path_factory):
    """The preset's dataset, generated once under its out_dir/data/."""
    cfg = load_config(None, TINY, values={"out_dir": str(tmp_path_factory.mktemp("data"))})
    return prepare_data(cfg, progress=False).path


def tiny(sine_store, tmp_path, *extra):
    cfg = load_config(None, TINY + [f'data.path="{sine_store}"', f'out_dir="{tmp_path}"', *extra])
    return cfg, prepare_data(cfg, progress=False)


@pytest.mark.parametrize("kind", ["warp", "gru", "lstm"])
def test_train_writes_a_complete_run_directory(sine_store, tmp_path, kind):
    cfg, data = tiny(sine_store, tmp_path, f'model.kind="{kind}"')
    res = train_and_evaluate(cfg, data, kind, cfg.model, tmp_path / kind, progress=False)
    for name in (
        "config.toml",
        "run.json",
        "best.pt",
        "last.pt",
        "history.json",
        "loss.png",
        "metrics.json",
    ):
        assert (tmp_path / kind / name).is_file(), name
    metrics = json.loads((tmp_path / kind / "metrics.json").read_text())
    for split in ("test", "test_ood"):
        m = metrics["splits"][split]
        assert len(m["model"]["per_horizon_mse"]) == data.n_steps - cfg.data.context
        assert set(m["references"]) == {"persistence", "zero", "mean", "linear_fit", "ode_fit"}
    assert "in_range" in metrics["splits"]["test_ood"]["model"]
    assert res["train"]["steps"] == 8


def test_interrupted_training_resumes_to_the_same_weights(sine_store, tmp_path, monkeypatch):
    cfg, data = tiny(sine_store, tmp_path)
    train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "full", progress=False)

    from warp_phys import optim

    real_step, calls = optim.Optimiser.step, {"n": 0}

    def dying_step(self, loss, progress):
        calls["n"] += 1
        if calls["n"] == 6:  # after the checkpoint of step 4, before the one of step 6
            raise KeyboardInterrupt
        return real_step(self, loss, progress)

    monkeypatch.setattr(optim.Optimiser, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "cut", progress=False)
    monkeypatch.setattr(optim.Optimiser, "step", real_step)
    train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "cut", resume=True, progress=False)

    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert cut["state"]["step"] == full["state"]["step"] == 8
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k


def poison_losses(monkeypatch, bad):
    """Make the training loss NaN on the calls whose 1-based number `bad(n)` accepts."""
    from warp_phys import train as train_mod

    real, calls = train_mod.step_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if bad(calls["n"]) else loss

    monkeypatch.setattr(train_mod, "step_loss", poisoned)
    return calls


def test_a_non_finite_batch_is_skipped_without_an_update(sine_store, tmp_path, monkeypatch):
    cfg, data = tiny(sine_store, tmp_path)
    clean = train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "clean", progress=False)
    calls = poison_losses(monkeypatch, lambda n: n == 5)
    res = train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "r", progress=False)
    assert calls["n"] == 9  # 8 updates and the one skipped batch
    summary = json.loads((tmp_path / "r" / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["skipped_batches"] == 1 and summary["stopped"] == ""
    assert clean["train"]["skipped_batches"] == 0
    assert res["train"] == summary


def test_non_finite_losses_in_a_row_stop_early_and_keep_the_best(sine_store, tmp_path, monkeypatch):
    from warp_phys.train import MAX_SKIPPED_IN_A_ROW

    cfg, data = tiny(sine_store, tmp_path)
    poison_losses(monkeypatch, lambda n: n >= 5)  # every batch from the fifth on
    res = train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "r", progress=False)
    summary = res["train"]
    assert summary["steps"] == 4 and summary["skipped_batches"] == MAX_SKIPPED_IN_A_ROW
    assert summary["stopped"].startswith(
        f"non-finite loss or gradient on {MAX_SKIPPED_IN_A_ROW} batches in a row at step 4"
    )
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert best["step"] in (2, 4) and summary["best_step"] == best["step"]
    for split in ("test", "test_ood"):  # the kept checkpoint was evaluated
        assert res["metrics"]["splits"][split]["model"]["mse"] < float("inf")


def test_context_must_be_shorter_than_the_series(sine_store, tmp_path):
    cfg, data = tiny(sine_store, tmp_path, "data.context=16")
    with pytest.raises(UserError, match="context L=16 must be at least 1 and below the 16 steps"):
        train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "r", progress=False)


def test_cuda_without_a_gpu_is_a_clear_error(sine_store, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg, data = tiny(sine_store, tmp_path, 'train.device="cuda"')
    with pytest.raises(UserError, match="CUDA was asked for"):
        train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "r", progress=False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            'model.kind="transformer"',
            "model.kind = 'transformer' is not allowed: it must be one of warp, gru, lstm",
        ),
        ('model.prior="nope"', "unknown prior 'nope'; registered priors: "),
        ('model.prior="ode"', None),  # fine: sine has a registered ode prior
        (
            'model.prior="ode"\nmodel.prior_options={system_name="msd"}',
            "has 2 states .* but the dataset has 1",
        ),
        (
            "model.prior_options={widht=8}",
            "unknown option 'widht' for prior 'blackbox'; its options are ",
        ),
    ],
)
def test_model_config_errors_name_the_valid_choices(sine_store, tmp_path, override, message):
    if message is None:
        cfg, data = tiny(sine_store, tmp_path, *override.split("\n"), "train.steps=1")
        train_and_evaluate(cfg, data, "m", cfg.model, tmp_path / "r", progress=False)
        return
    with pytest.raises(UserError, match=message):  # when the config is built, or the model
        cfg, data = tiny(sine_store, tmp_path, *override.split("\n"), "train.steps=1")
        train_and_evaluate(cfg, data, "m", cfg.model, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()  # nothing written before the inputs were checked


def interrupt_at_step(monkeypatch, n: int) -> None:
    """Make the n-th optimiser step raise KeyboardInterrupt (a kill, as far as the run can tell)."""
    from warp_phys import optim

    real_step, calls = optim.Optimiser.step, {"n": 0}

    def dying_step(self, loss, progress):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, loss, progress)

    monkeypatch.setattr(optim.Optimiser, "step", dying_step)


def test_resume_needs_a_run_and_a_readable_checkpoint(sine_store, tmp_path, monkeypatch):
    cfg, data = tiny(sine_store, tmp_path)
    with pytest.raises(
        UserError, match="nothing to resume in .*r .no run.json.; run without --resume"
    ):
        train_and_evaluate(
            cfg, data, "warp", cfg.model, tmp_path / "r", resume=True, progress=False
        )
    interrupt_at_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "r", progress=False)
    monkeypatch.undo()
    (tmp_path / "r" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="last.pt is corrupt"):
        train_and_evaluate(
            cfg, data, "warp", cfg.model, tmp_path / "r", resume=True, progress=False
        )


def test_resume_with_other_settings_names_the_difference(sine_store, tmp_path):
    cfg, data = tiny(sine_store, tmp_path)
    train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "r", progress=False)
    cfg2, _ = tiny(sine_store, tmp_path, "model.prior_options={width=16, depth=1}")
    with pytest.raises(
        UserError, match=r"other settings \(model.prior_options.width = 8 in the run, 16 now\)"
    ):
        train_and_evaluate(
            cfg2, data, "warp", cfg2.model, tmp_path / "r", resume=True, progress=False
        )


def test_checkpoint_of_another_model_is_refused(sine_store, tmp_path, monkeypatch):
    cfg, data = tiny(sine_store, tmp_path)
    interrupt_at_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "r", progress=False)
    monkeypatch.undo()
    cfg2, _ = tiny(sine_store, tmp_path, 'model.kind="gru"')
    train_and_evaluate(cfg2, data, "gru", cfg2.model, tmp_path / "g", progress=False)
    (tmp_path / "g" / "last.pt").replace(tmp_path / "r" / "last.pt")  # a last.pt of another run
    with pytest.raises(UserError, match="does not fit this model"):
        train_and_evaluate(
            cfg, data, "warp", cfg.model, tmp_path / "r", resume=True, progress=False
        )


def test_a_run_that_never_validates_finite_is_reported_failed_not_evaluated(
    sine_store, tmp_path, monkeypatch
):
    from warp_phys import train as train_mod

    monkeypatch.setattr(train_mod, "val_score", lambda *a, **k: float("inf"))
    cfg, data = tiny(sine_store, tmp_path)
    got = train_and_evaluate(cfg, data, "warp", cfg.model, tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "best.pt").is_file()  # a checkpoint is kept all the same
    assert "never produced a finite validation score" in got["failed"]
    assert "metrics" not in got and got["predictions"] == {}
    assert "failed" in json.loads((tmp_path / "r" / "metrics.json").read_text())


def test_val_score_of_a_diverged_forecast_is_inf_not_nan(sine_store, tmp_path):
    from warp_phys.train import val_score

    class Exploding(torch.nn.Module):
        def forward(self, ys, *, context, **kw):
            from warp_phys.forecaster import Forecast

            return Forecast(torch.full_like(ys[:, 1:], float("nan")), None)

    cfg, data = tiny(sine_store, tmp_path)
    ys = data.splits["val"].y
    assert val_score(Exploding(), ys, data.scale(), 6, 4) == float("inf")


@pytest.mark.parametrize("optimizer", ["adam", "paper"])
def test_a_non_finite_gradient_makes_no_update(optimizer):
    from warp_phys.config import TrainConfig
    from warp_phys.optim import Optimiser

    w = torch.nn.Parameter(torch.ones(3))
    opt = Optimiser(TrainConfig(optimizer=optimizer, lr=0.1), [w])
    assert not opt.step((w * torch.tensor([1.0, float("inf"), 1.0])).sum() * 0.0, 0.5)
    assert torch.equal(w.detach(), torch.ones(3))  # inf · 0 = NaN gradient: untouched
    assert opt.step(w.sum(), 0.5) and not torch.equal(w.detach(), torch.ones(3))


def test_the_paper_plateau_halves_the_rate_after_20_flat_windows_of_50_steps_with_a_floor():
    from warp_phys.optim import WindowedPlateau

    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=1.0)
    plateau = WindowedPlateau(opt)
    for _ in range(50 * 21):  # the first window sets the best, 20 flat ones are patience
        plateau.step(1.0)
    assert opt.param_groups[0]["lr"] == 1.0
    for _ in range(50):  # the 21st flat window after the best: halve
        plateau.step(1.0)
    assert opt.param_groups[0]["lr"] == 0.5
    for _ in range(50 * 21 * 20):  # many more plateaus: never below 1e-2 of the initial rate
        plateau.step(1.0)
    assert opt.param_groups[0]["lr"] == 0.01
    state = plateau.state_dict()
    again = WindowedPlateau(torch.optim.SGD([w], lr=1.0))
    again.load_state_dict(state)
    assert again.state_dict() == state
