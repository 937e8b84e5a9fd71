"""The Optuna storage of a sweep, made to survive a database restart.

A PostgreSQL restart (or failover) closes every pooled connection; Optuna's `RDBStorage` then
fails the next call on such a connection with `StorageInternalError: ... invalid data in the
commit, e.g. exceeding max length` (the real cause, e.g. `psycopg.errors.AdminShutdown`, only
inside it), and every call fails while the database is down. Here:

* connections are checked before use (SQLAlchemy `pool_pre_ping`, through `engine_kwargs`), so
  a connection the restart closed is replaced instead of failing the call;
* a call that fails because the database cannot be reached is retried with backoff (1, 2, 4,
  ... 10 s) for up to EM_LAB_STORAGE_RETRY_SECONDS (default 300), so the workers carry on across
  a restart; the console says once that the storage is unreachable, and when it is back;
* past that, `StudyStorageGone`: one line, "the Optuna storage at ... went away: <cause>"; later
  calls fail at once, so the worker ends instead of waiting out the budget again per call.

Only connection errors are retried (SQLAlchemy `OperationalError`/`InterfaceError`, or a
connection it marked invalid): an integrity error or a bad query fails as before.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time

from optuna.storages import RDBStorage

from em_core.errors import EmLabError
from em_core.tracking import scrub

log = logging.getLogger(__name__)
RETRY_ENV = "EM_LAB_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
MAX_DELAY = 10.0
# RDBStorage methods that do not touch the database, or that must not block
_NOT_RETRIED = {"get_heartbeat_interval", "get_failed_trial_callback", "get_heartbeat_stale_trial_callback", "remove_session", "get_all_versions",
                "get_head_version"}


class StudyStorageGone(EmLabError):
    """The Optuna storage stayed unreachable for longer than the retry budget."""


def retry_seconds() -> float:
    return float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_SECONDS)


def is_connection_error(error: BaseException) -> bool:
    """The database could not be reached or dropped the connection (pure but for imports)."""
    from sqlalchemy import exc

    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (exc.OperationalError, exc.InterfaceError)):
            return True
        if isinstance(e, exc.DBAPIError) and e.connection_invalidated:
            return True
        if type(e).__module__.startswith("psycopg") and type(e).__name__ in (
                "OperationalError", "InterfaceError", "AdminShutdown", "CrashShutdown", "CannotConnectNow"):
            return True
        e = e.__cause__ or e.__context__
    return False


def root_cause(error: BaseException) -> str:
    """`Type: first line` of the database driver's error in the chain (else the innermost one),
    credentials masked."""
    e, seen, chain = error, set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    drivers = [x for x in chain if type(x).__module__.split(".")[0] in ("psycopg", "psycopg2", "pymysql", "sqlite3")]
    e = drivers[0] if drivers else chain[-1]
    line = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
    return scrub(f"{type(e).__name__}: {line}")[:300]


_local = threading.local()


def _retrying(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if getattr(_local, "depth", 0):  # called from another storage method: the outermost retries
            return fn(self, *args, **kwargs)
        _local.depth = 1
        try:
            return self._em_call(fn.__name__, lambda: fn(self, *args, **kwargs))
        finally:
            _local.depth = 0
    return wrapper


class RetryingRDBStorage(RDBStorage):
    """`RDBStorage` whose calls wait out a database restart (module doc)."""

    def __init__(self, url: str, *args, **kwargs):
        self._em_url = scrub(url)
        self._em_gone: str | None = None
        self._em_down_since: float | None = None
        self._em_lock = threading.Lock()
        # at start a shorter wait: an unreachable URL is more often a typo than a restart
        self._em_call("connect", lambda: super(RetryingRDBStorage, self).__init__(url, *args, **kwargs),
                      budget=min(retry_seconds(), 30.0))

    def _em_call(self, what: str, call, budget: float | None = None):
        budget, delay, deadline = retry_seconds() if budget is None else budget, 1.0, None
        while True:
            if self._em_gone:
                raise StudyStorageGone(self._em_gone)
            try:
                result = call()
            except Exception as e:
                if not is_connection_error(e):
                    raise
                now = time.monotonic()
                with self._em_lock:
                    if self._em_down_since is None:  # once per outage, whichever thread meets it first
                        self._em_down_since = now
                        log.warning("the Optuna storage at %s is unreachable (%s); retrying for up to %.0f s (%s)",
                                    self._em_url, root_cause(e), budget, RETRY_ENV)
                deadline = deadline if deadline is not None else now + budget
                if now + delay > deadline:
                    if what == "connect":
                        raise StudyStorageGone(f"the Optuna storage at {self._em_url} is unreachable: {root_cause(e)} "
                                               f"(retried {budget:.0f} s); check the URL, and that the database "
                                               "is up") from None
                    self._em_gone = (f"the Optuna storage at {self._em_url} went away: {root_cause(e)} (retried "
                                     f"{budget:.0f} s, {RETRY_ENV}); the trials this worker had running are failed "
                                     "by the next worker once the storage is back; rerun this command to carry on")
                    if what == "record_heartbeat":  # Optuna's heartbeat thread: the main thread reports it
                        return None
                    raise StudyStorageGone(self._em_gone) from None
                time.sleep(delay)
                delay = min(2 * delay, MAX_DELAY)
                continue
            if self._em_down_since is not None:
                with self._em_lock:
                    if self._em_down_since is not None:
                        log.warning("the Optuna storage at %s is back after %.0f s", self._em_url,
                                    time.monotonic() - self._em_down_since)
                        self._em_down_since = None
            return result

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_em_lock", None)
        return state

    def __setstate__(self, state):
        state["_em_lock"] = threading.Lock()
        super().__setstate__(state)


# also the private methods Optuna's `_CachedStorage` calls on its backend
_PRIVATE_RETRIED = {"_get_trials", "_create_new_trial", "_get_best_trial_id", "_get_stale_trial_ids",
                    "_set_trial_param"}
for _name, _fn in list(vars(RDBStorage).items()):
    if callable(_fn) and (not _name.startswith("_") or _name in _PRIVATE_RETRIED) and _name not in _NOT_RETRIED:
        setattr(RetryingRDBStorage, _name, _retrying(_fn))
for _base in RDBStorage.__mro__[1:]:  # BaseStorage's concrete helpers (get_best_trial, ...)
    for _name, _fn in list(vars(_base).items()):
        if (callable(_fn) and not _name.startswith("_") and _name not in _NOT_RETRIED
                and _name not in vars(RetryingRDBStorage) and not getattr(_fn, "__isabstractmethod__", False)):
            setattr(RetryingRDBStorage, _name, _retrying(_fn))


def engine_kwargs(url: str) -> dict:
    """SQLite: wait for the file lock; any server database: check connections before use."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}
