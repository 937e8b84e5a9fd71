"""A persistent key -> JSON record cache on sqlite, written as each result arrives.

The judge keeps its verdicts here and API sampling its answers, so a re-run or a run after a
crash never pays for a request twice. Base layer: no em_core imports.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


class JudgmentCache:
    """sqlite file (WAL), one row per judgment: key -> JSON record {raw, prompt_tokens,
    completion_tokens}. Every put commits, so a killed process loses at most the request in
    flight. path=None keeps the cache in memory (deduplication within one judge object only)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # The sync wrapper may run the event loop in a worker thread, hence the lock instead of
        # sqlite's same-thread check.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path), check_same_thread=False)
        with self._lock:
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("PRAGMA busy_timeout=30000")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, backend TEXT, model TEXT, mode TEXT,"
                " kind TEXT, record TEXT NOT NULL, created_at REAL NOT NULL)"
            )
            self._db.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            for i in range(0, len(keys), 500):  # stay under sqlite's bound-variable limit
                chunk = keys[i : i + 500]
                q = f"SELECT key, record FROM judgments WHERE key IN ({','.join('?' * len(chunk))})"
                for key, record in self._db.execute(q, chunk):
                    found[key] = json.loads(record)
        return found

    def put(self, key: str, record: Mapping[str, Any], *, backend: str, model: str, mode: str, kind: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, backend, model, mode, kind, json.dumps(record), time.time()),
            )
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
