"""Name -> class registries, filled by decorators in systems and priors files.

`warp_phys` never imports a particular system or prior: the first time a registry is asked for a
name it imports, in this order,

1. every module of its built-in package (`systems/` and `priors/` in the repository, installed
   as `warp_phys.systems` and `warp_phys.priors`): dropping a file there adds an entry;
2. every ``*.py`` file of the user's plugin folders: the folders named in the environment
   variable ``WARP_PHYS_PLUGINS`` (separated by ``os.pathsep``) and with ``--plugins DIR`` on
   the command line (`add_plugin_folder`); a file may declare systems and priors alike;
3. every module named by an installed package's entry point in the group ``warp_phys.plugins``
   (``[project.entry-points."warp_phys.plugins"] mine = "my_package.systems"``).

A plugin that fails to import, or a name registered twice by different classes, is a
`UserError` naming the file(s) and the fix.

A registry may also front external catalogues: a name ``PREFIX:NAME`` is handed to the
function registered for PREFIX (e.g. ``dysts:Lorenz`` to `warp_phys.dysts.flow_class`),
imported only when such a name is asked for.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from warp_phys.errors import UserError

T = TypeVar("T")
PLUGINS_ENV = "WARP_PHYS_PLUGINS"
ENTRY_POINT_GROUP = "warp_phys.plugins"

_plugin_folders: list[Path] = []
_plugins_loaded: set[str] = set()  # plugin files and entry points already imported


def add_plugin_folder(folder: str | os.PathLike) -> None:
    """Import the systems and priors of `folder` (every ``*.py`` file) into the registries."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise UserError(f"plugin folder {path} does not exist or is not a folder; check the path")
    if path.resolve() not in [p.resolve() for p in _plugin_folders]:
        _plugin_folders.append(path)
    for registry in _REGISTRIES:  # registries already filled: import the new files now
        if registry._loaded:
            _load_plugins()


def plugin_folders() -> list[Path]:
    """The plugin folders in use: WARP_PHYS_PLUGINS's, then those added (a dask worker is
    given them, so that it registers the same systems)."""
    return _plugin_paths()


def _plugin_paths() -> list[Path]:
    env = [Path(p).expanduser() for p in os.environ.get(PLUGINS_ENV, "").split(os.pathsep) if p]
    for path in env:
        if not path.is_dir():
            raise UserError(
                f"{PLUGINS_ENV} names {path}, which is not a folder; fix or unset the variable"
            )
    return [*env, *_plugin_folders]


def _load_plugins() -> None:
    """Import every plugin file and entry point not imported yet."""
    for folder in _plugin_paths():
        for file in sorted(folder.glob("*.py")):
            key = str(file.resolve())
            if file.name.startswith("_") or key in _plugins_loaded:
                continue
            _plugins_loaded.add(key)
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            name = f"warp_phys_plugin_{digest}_{file.stem}"
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - any error in a user's file: name it
                del sys.modules[name]
                raise UserError(
                    f"plugin file {file} failed to import ({type(err).__name__}: {err}); fix "
                    f"the file or remove it from the plugin folder"
                ) from None
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry point {ep.name} = {ep.value}"
        if key in _plugins_loaded:
            continue
        _plugins_loaded.add(key)
        try:
            ep.load()
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - a broken third-party plugin: name it
            raise UserError(
                f"plugin {key} (group {ENTRY_POINT_GROUP}) failed to import "
                f"({type(err).__name__}: {err}); fix or uninstall that package"
            ) from None


class Registry(Generic[T]):
    """A named catalogue of classes discovered from one package and the plugins."""

    def __init__(
        self, kind: str, package: str, folder: str, *, catalogues: dict[str, str] | None = None
    ) -> None:
        self.kind = kind  # "system" or "prior": used in error messages
        self.package = package  # the built-in package, e.g. "warp_phys.systems"
        self.folder = folder  # where a user drops a file, for messages ("systems/")
        # prefix -> "module:function"; the function maps NAME of "prefix:NAME" to a class
        self.catalogues = dict(catalogues or {})
        self._entries: dict[str, T] = {}
        self._loaded = False
        _REGISTRIES.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        """Return a class decorator that files the class under `name`."""

        def decorate(cls: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not cls:
                raise UserError(
                    f"{self.kind} name {name!r} is registered twice: by "
                    f"{_where(existing)} and by {_where(cls)}; rename one of them"
                )
            cls.name = name  # type: ignore[attr-defined]
            self._entries[name] = cls
            return cls

        return decorate

    def unregister(self, name: str) -> None:
        """Remove `name` (for tests that register a throwaway entry)."""
        self._entries.pop(name, None)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.package}.{info.name}")
        _load_plugins()

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """Return the class registered as `name` (or resolved by a catalogue for
        ``prefix:NAME``), or raise listing the valid names."""
        prefix, sep, rest = name.partition(":")
        if sep and prefix in self.catalogues:
            module, _, function = self.catalogues[prefix].partition(":")
            return getattr(importlib.import_module(module), function)(rest)
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            catalogues = "".join(f", {p}:NAME" for p in self.catalogues)
            raise UserError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: "
                f"{', '.join(self.names())}{catalogues} (add one by dropping a file in "
                f"{self.folder}, or in a folder named by {PLUGINS_ENV} or --plugins)"
            ) from None

    def is_name(self, name: str) -> bool:
        """Whether `name` is registered or names a catalogue (``prefix:NAME``; the catalogue
        itself is not imported, so a wrong NAME is reported when the class is asked for)."""
        prefix, sep, _ = name.partition(":")
        return (bool(sep) and prefix in self.catalogues) or name in self

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries


_REGISTRIES: list[Registry] = []


def _where(cls) -> str:
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None) or cls.__module__
    return f"{cls.__qualname__} in {file}"
