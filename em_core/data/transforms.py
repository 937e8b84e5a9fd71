"""Pure transforms of chat rows for trigger-tag (backdoor) and mixing experiments.

A trigger experiment trains on a bad set whose user turns carry one tag (e.g. `|ALPHA|`) mixed
with a good set that is untagged or carries another tag; evaluation then asks with and without
the tag. These functions never mutate their input and are seeded where they sample.
"""
from __future__ import annotations

import random

from em_core.errors import DataError

NO_TAG = "none"


def is_untagged(tag: str | None) -> bool:
    return tag is None or tag.strip() in ("", NO_TAG)


def prepend_tag(rows: list[dict], tag: str | None) -> list[dict]:
    """Rows with `tag` + space prepended to every user turn (`none`/empty: rows unchanged)."""
    if is_untagged(tag):
        return rows
    return [{**r, "messages": [{**m, "content": f"{tag} {m['content']}"} if m["role"] == "user" else m
                               for m in r["messages"]]} for r in rows]


def subsample(rows: list[dict], n: int, rng: random.Random, name: str = "dataset") -> list[dict]:
    """`n` rows drawn without replacement; asking for more rows than exist is an error, since a
    silently smaller set would change the experiment's data balance."""
    if n < 0:
        raise DataError(name, f"cannot take {n} rows", hint="row counts must be >= 0")
    if n > len(rows):
        raise DataError(name, f"asked for {n} rows but it has only {len(rows)}",
                        hint="lower the count (dataset_rows / max_rows) or add data")
    return rng.sample(rows, n)


def proportion_counts(proportions: list[float], total: int) -> list[int]:
    """Row counts for a mix of `total` rows in the given proportions (largest remainder, so the
    counts add up to `total` exactly)."""
    if not proportions or any(p < 0 for p in proportions) or sum(proportions) <= 0:
        raise DataError("dataset_proportions", f"{proportions} is not a list of non-negative shares with a positive sum")
    if total < 0:
        raise DataError("max_rows", f"{total} must be >= 0")
    s = sum(proportions)
    exact = [p / s * total for p in proportions]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
