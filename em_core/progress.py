"""Progress bars: tqdm, quiet when EM_LAB_NO_PROGRESS is set (CI logs)."""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(it: Iterable[T], desc: str, total: int | None = None, **kw) -> tqdm:
    return tqdm(it, desc=desc, total=total, disable=bool(os.environ.get("EM_LAB_NO_PROGRESS")),
                dynamic_ncols=True, **kw)
