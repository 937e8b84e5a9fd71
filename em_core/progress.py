"""Progress bars: tqdm, quiet when EM_LAB_NO_PROGRESS is set (CI logs). Inside `one_bar()` the
bars of nested work are hidden (unless EM_LAB_VERBOSE=1), so a step shows one bar, not one per
checkpoint or batch group."""
from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("em_progress_inside", default=False)


def hidden() -> bool:
    """No bar here: progress is off, or an enclosing `one_bar()` already shows this work."""
    if os.environ.get("EM_LAB_NO_PROGRESS"):
        return True
    return _INSIDE.get() and os.environ.get("EM_LAB_VERBOSE") != "1"


def progress(it: Iterable[T], desc: str, total: int | None = None, **kw) -> tqdm:
    return tqdm(it, desc=desc, total=total, disable=hidden(), dynamic_ncols=True, **kw)


@contextlib.contextmanager
def one_bar(it: Iterable[T], desc: str, total: int | None = None, **kw) -> Iterator[tqdm]:
    """A bar over `it` whose inner bars stay hidden while the block runs."""
    bar = progress(it, desc=desc, total=total, **kw)
    token = _INSIDE.set(True)
    try:
        yield bar
    finally:
        _INSIDE.reset(token)
        bar.close()
