"""Config loading: presets, --set overrides, unknown keys."""

import pytest

from warp_phys.config import RunConfig, load_config, preset_names, to_toml
from warp_phys.errors import UserError


def test_defaults_load_without_preset():
    cfg = load_config(None)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.system == "msd"


def test_set_overrides_parse_toml_values():
    cfg = load_config(
        None, ["train.lr=3e-4", "model.anchored=false", "data.system=pendulum", "train.steps=7"]
    )
    assert cfg.train.lr == 3e-4 and cfg.model.anchored is False
    assert cfg.data.system == "pendulum" and cfg.train.steps == 7


def test_unknown_key_lists_valid_ones():
    with pytest.raises(
        UserError, match=r"unknown config key train\.lrr; valid keys of \[train\]: .*lr"
    ):
        load_config(None, ["train.lrr=1"])


def test_wrong_type_is_an_error():
    with pytest.raises(UserError, match="train.steps must be int"):
        load_config(None, ["train.steps=1.5"])


def test_unknown_preset_lists_presets():
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        load_config("nope")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_round_trips(name, tmp_path):
    cfg = load_config(name)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path)) == cfg


def test_compare_models_override_the_base_model():
    cfg = load_config(None, ['models.phys.prior="ode"', "models.phys.hold_after_context=true"])
    m = cfg.model_for("phys")
    assert m.prior == "ode" and m.hold_after_context and m.transition == cfg.model.transition
    with pytest.raises(UserError, match=r"unknown config key models\.x\.bogus"):
        load_config(None, ["models.x.bogus=1"])
