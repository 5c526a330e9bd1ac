"""One small registry type, used for every kind of plug-in (methods, datasets)."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from zsadx.config import suggest
from zsadx.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A name that no plug-in was registered under; the message suggests the closest one."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names (and aliases) to plug-ins. Names are matched case-insensitively."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    @staticmethod
    def _norm(name: str) -> str:
        return name.strip().lower().replace("_", "-")

    def register(self, name: str, item: T | None = None, aliases: tuple[str, ...] = ()):
        """Register ``item`` under ``name``; usable as a decorator when ``item`` is None."""
        def add(obj: T) -> T:
            key = self._norm(name)
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[key] = obj
            for alias in aliases:
                a = self._norm(alias)
                if a == key:
                    continue
                if a in self._items or (a in self._aliases and self._aliases[a] != key):
                    raise ValueError(f"{self.kind} alias '{alias}' is already taken")
                self._aliases[a] = key
            return obj
        return add(item) if item is not None else add

    def canonical(self, name: str) -> str:
        key = self._norm(name)
        key = self._aliases.get(key, key)
        if key not in self._items:
            choices = list(self._items) + list(self._aliases)
            raise UnknownNameError(f"unknown {self.kind} '{name}'" + suggest(self._norm(name), choices)
                                   + f"; known: {', '.join(sorted(self._items)) or '(none yet)'}")
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def __contains__(self, name: str) -> bool:
        try:
            self.canonical(name)
            return True
        except UnknownNameError:
            return False

    def names(self) -> list[str]:
        return sorted(self._items)

    def aliases_of(self, name: str) -> list[str]:
        key = self.canonical(name)
        return sorted(a for a, k in self._aliases.items() if k == key)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))

    def __len__(self) -> int:
        return len(self._items)
