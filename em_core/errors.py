"""Errors users see. Each names the file/line/field at fault and how to fix it."""
from __future__ import annotations


class EmLabError(Exception):
    """Base class: caught by the CLI, printed without a traceback, exit code 2."""


class ConfigError(EmLabError):
    """A config file or override is invalid."""


class DataError(EmLabError):
    """A dataset, question or answers file is invalid."""

    def __init__(self, path: str, problem: str, line: int | None = None, hint: str | None = None):
        self.path, self.line, self.problem, self.hint = str(path), line, problem, hint
        where = f"{path}:{line}" if line is not None else str(path)
        msg = f"{where}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


class JudgeError(EmLabError):
    """The judge backend could not be used at all (not: one reply was unscorable)."""


class StoreError(EmLabError):
    """The MLflow tracking store cannot be opened (damaged, half-migrated, unreachable)."""


class Terminated(BaseException):
    """The process got SIGTERM (a scheduler's preemption or time limit). A BaseException, like
    KeyboardInterrupt, so no `except Exception` swallows it; runs end KILLED with the reason."""


_SIGTERM_MESSAGE = "SIGTERM received (preempted, or a scheduler's time limit)"
_deferral = {"depth": 0, "pending": False}


def raise_on_sigterm() -> None:
    """Turn SIGTERM into `Terminated` in the main thread, so open runs unwind and end KILLED
    instead of staying RUNNING forever. No-op off the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills outright
        if _deferral["depth"]:
            _deferral["pending"] = True  # raised when the extension call returns (`sigterm_deferred`)
            return
        raise Terminated(_SIGTERM_MESSAGE)

    signal.signal(signal.SIGTERM, handler)


class sigterm_deferred:  # noqa: N801 -- used as a context manager, like contextlib's
    """Hold `Terminated` back while a C extension call runs (Ray's `wait`/`get`): an exception
    raised inside one surfaces as a SystemError and may leave the library in a broken state.
    Raised on leaving the block instead; keep the block short (a bounded wait)."""

    def __enter__(self):
        _deferral["depth"] += 1
        return self

    def __exit__(self, *exc):
        _deferral["depth"] -= 1
        if not _deferral["depth"] and _deferral["pending"]:
            _deferral["pending"] = False
            raise Terminated(_SIGTERM_MESSAGE)
        return False
