"""Progress bars for long work: tqdm when installed, otherwise a plain line on stderr, off when quiet."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=total, desc=desc, leave=False)
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    for index, item in enumerate(items, 1):
        yield item
        print(f"\r{desc} {index}/{total if total is not None else '?'}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
