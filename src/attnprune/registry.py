"""A tiny name -> object registry, used for backends, policies, models, data sources and CLI commands."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import InvalidArgumentError

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
