"""Packaging and plug-ins: the wheel carries the presets and no generic top-level package;
user folders and entry points add systems and priors; broken plug-ins are one clear error."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from warp_phys import registry
from warp_phys.cli import main
from warp_phys.errors import UserError
from warp_phys.system import SYSTEMS, get_system

ROOT = Path(__file__).resolve().parent.parent

PLUGIN = '''
import torch
from warp_phys import Box, Param, System, register_system


@register_system("{name}")
class Decay(System):
    """x' = -k x."""

    state = ("x",)
    params = {{"k": Param(1.0, train=(0.5, 1.5))}}
    y0 = Box(low=(0.5,), high=(1.5,))
    n_steps = 16

    def vector_field(self, t, y, p):
        return -p.k.unsqueeze(-1) * y
'''


@pytest.fixture
def plugins(monkeypatch):
    """Fresh plug-in bookkeeping for one test; names registered here are removed after."""
    monkeypatch.setattr(registry, "_plugin_folders", [])
    monkeypatch.setattr(registry, "_plugins_loaded", set())
    monkeypatch.delenv(registry.PLUGINS_ENV, raising=False)
    before = set(SYSTEMS.names())
    yield
    for name in set(SYSTEMS._entries) - before:
        SYSTEMS.unregister(name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of a copy of this repository (setuptools builds in the source tree), built
    without network or build isolation."""
    src, out = tmp_path_factory.mktemp("src") / "repo", tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".git", ".venv", "build", "out", "__pycache__", "*.egg-info")
    shutil.copytree(ROOT, src, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return next(out.glob("warp_phys-*.whl"))


def test_the_wheel_ships_presets_and_nothing_generic_at_the_top(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"warp_phys", next(t for t in tops if t.endswith(".dist-info"))}
    assert "warp_phys/presets/msd_small.toml" in names
    assert "warp_phys/systems/duffing.py" in names and "warp_phys/priors/lsq.py" in names
    assert not any("/out/" in n or "/results/" in n for n in names)  # run outputs stay home


def test_the_installed_package_finds_its_presets_from_any_folder(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    empty = tmp_path / "elsewhere"
    (empty / "runs").mkdir(parents=True)  # a runs/ folder here must hide nothing
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import warp_phys; assert warp_phys.__file__.startswith(sys.argv[1]), warp_phys.__file__;"
        "from warp_phys.config import load_config, preset_names;"
        "assert 'msd_small' in preset_names(); print(load_config('msd_small').name);"
        "from warp_phys.system import system_names; print(' '.join(system_names()))"
    )
    got = subprocess.run(
        [sys.executable, "-I", "-c", code, str(site)], cwd=empty, capture_output=True,
        text=True, timeout=300,
        env={"PYTHONPATH": ":".join(p for p in sys.path if "site-packages" in p)},
    )  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    assert "msd_small" in got.stdout and "duffing" in got.stdout


def test_a_plugin_folder_adds_a_system_from_the_environment(plugins, tmp_path, monkeypatch):
    (tmp_path / "decay.py").write_text(PLUGIN.format(name="plugin_decay"))
    monkeypatch.setenv(registry.PLUGINS_ENV, str(tmp_path))
    monkeypatch.setattr(SYSTEMS, "_loaded", False)
    assert get_system("plugin_decay").state == ("x",)


def test_the_plugins_option_adds_a_system_to_every_verb(plugins, tmp_path, capsys):
    (tmp_path / "decay.py").write_text(PLUGIN.format(name="plugin_decay_cli"))
    assert main(["--plugins", str(tmp_path), "systems"]) == 0
    assert "plugin_decay_cli" in capsys.readouterr().out


def test_a_broken_plugin_file_is_named_with_its_error(plugins, tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import torch\ndef broken(:\n")
    assert main(["--plugins", str(tmp_path), "systems"]) == 2
    err = capsys.readouterr().err
    assert "broken.py failed to import (SyntaxError" in err and len(err.splitlines()) == 1


def test_two_plugins_registering_one_name_are_both_named(plugins, tmp_path, capsys):
    (tmp_path / "a.py").write_text(PLUGIN.format(name="plugin_twice"))
    (tmp_path / "b.py").write_text(PLUGIN.format(name="plugin_twice"))
    assert main(["--plugins", str(tmp_path), "systems"]) == 2
    err = capsys.readouterr().err
    assert "registered twice" in err and "a.py" in err and "b.py" in err


def test_an_entry_point_registers_a_third_party_system(plugins, tmp_path, monkeypatch):
    (tmp_path / "thirdparty_decay.py").write_text(PLUGIN.format(name="plugin_entry"))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("decay", "thirdparty_decay", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        registry.importlib.metadata, "entry_points",
        lambda group=None: [ep] if group == registry.ENTRY_POINT_GROUP else [],
    )  # fmt: skip
    monkeypatch.setattr(SYSTEMS, "_loaded", False)
    assert "plugin_entry" in SYSTEMS.names()


def test_a_missing_plugin_folder_is_one_clear_error(plugins, tmp_path):
    with pytest.raises(UserError, match="does not exist or is not a folder"):
        registry.add_plugin_folder(tmp_path / "nowhere")
