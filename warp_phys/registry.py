"""Name -> class registries, filled by decorators in `systems/` and `priors/`.

`warp_phys` never imports a particular system or prior: a registry imports every module of
its package (`systems` or `priors`) the first time it is asked for a name, so dropping a
file into that folder is all it takes to add an entry.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from warp_phys.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named catalogue of classes discovered from one package."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind  # "system" or "prior": used in error messages
        self.package = package
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        """Return a class decorator that files the class under `name`."""

        def decorate(cls: T) -> T:
            if name in self._entries and self._entries[name] is not cls:
                existing = self._entries[name]
                raise ValueError(
                    f"{self.kind} name {name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}; pick another name"
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

    def names(self) -> list[str]:
        """Return the registered names, sorted."""
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """Return the class registered as `name`, or raise listing the valid names."""
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: "
                f"{', '.join(self.names())} (add one by dropping a file in {self.package}/)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries
