"""A tiny name -> object registry shared by models, pruners and data sets.

Adding an entry is one decorator; an unknown name is an error that lists every known name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from dpai_lib.errors import UserError, unknown

T = TypeVar("T")


class UnknownNameError(KeyError, UserError):
    """Raised for a name that is not registered; the message suggests the closest registered name and lists
    them all. A ``KeyError`` (a failed look-up) and a :class:`~dpai_lib.errors.UserError` (a user's typo)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to objects (usually builder functions) of one kind, e.g. ``"model"``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._versions: dict[str, int] = {}

    def register(self, name: str, *, version: int = 1) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; registering a name twice is an error.

        ``version``: raised whenever a change alters what the entry produces for the same arguments (a
        pruner's masks, a model's initial weights), so that run ids - which hash it - change too and
        records made with the old code are no longer taken for current ones."""
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"version of {self.kind} {name!r} must be an integer >= 1; got {version!r}")

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            self._versions[name] = version
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable "name", e.g. arguments in the wrong order
            raise UnknownNameError(unknown(self.kind, name, sorted(self._entries))) from None

    def version(self, name: str) -> int:
        """The code version of a registered entry (see :meth:`register`)."""
        self.get(name)
        return self._versions[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
