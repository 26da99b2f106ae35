"""A name -> implementation registry; the name is the id on the wire."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from saliency_service.core.errors import NotFound

T = TypeVar("T")


class Registry(Generic[T]):
    """Holds one kind of plug-in (methods, metrics, templates) keyed by its wire id."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: `@METHODS.register("grad_cam")`."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            setattr(item, "name", name)  # noqa: B010 - T is any plug-in class
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise NotFound(
                f"UNKNOWN_{self.kind.upper().replace(' ', '_')}",
                f"unknown {self.kind} '{name}'; available: {', '.join(sorted(self._items))}",
                {self.kind.replace(" ", "_"): name},
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items[name] for name in sorted(self._items))

    def __contains__(self, name: object) -> bool:
        return name in self._items
