"""Progress bars for long work (tqdm, a dependency of physai), off when quiet."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    """``items`` with a tqdm bar on stderr (``enabled``), cleared when done."""
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc=desc, leave=False))
