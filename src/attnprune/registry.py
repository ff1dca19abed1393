"""A tiny name -> object registry, used for backends, policies, models, data sources and CLI commands,
and :func:`import_modules`, which imports the modules that fill one."""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Generic, Iterable, Iterator, TypeVar

from .errors import InvalidArgumentError, PluginImportError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. ``@reg.register("name")`` adds one; ``reg.get("name")`` looks it up.

    Unknown names raise ``InvalidArgumentError`` listing the known ones.
    """

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "(none)"
            raise InvalidArgumentError(f"unknown {self.what} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)


def import_modules(modules: Iterable[str], what: str) -> None:
    """Import the modules that register entries (``what``: e.g. "model loader"). A module that fails to
    import raises :class:`PluginImportError` naming it and the failed import, so a broken module is not
    mistaken for a missing name. Such modules import optional packages inside their functions."""
    for mod in modules:
        if mod in sys.modules:
            continue
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise PluginImportError(f"the {what} module {mod} cannot be imported ({type(e).__name__}: {e}); "
                                    f"fix or remove it") from e
