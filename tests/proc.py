"""Spawning `python -m ...`, `em` and `mlflow run` from tests: each child gets its own process
group (session), one thread per torch process, and on timeout (or any error) the whole group is
killed -- `mlflow run` starts a grandchild that would otherwise keep training for many minutes."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence


def child_env(env: dict | None = None) -> dict:
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: torch children must not oversubscribe
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def spawn(cmd: Sequence[str], env: dict | None = None, **kw) -> subprocess.Popen:
    """Popen in a new session; pair with `kill_group` (or use `spawned`)."""
    return subprocess.Popen(list(cmd), env=child_env(env), start_new_session=True, **kw)


@contextlib.contextmanager
def spawned(cmd: Sequence[str], env: dict | None = None, **kw) -> Iterator[subprocess.Popen]:
    """A background child whose group is killed when the block is left, however it is left."""
    proc = spawn(cmd, env, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill_group(proc)
        # grandchildren outlive a child that exited by itself: sweep the group either way
        kill_group(proc)
        with contextlib.suppress(Exception):
            proc.communicate(timeout=10)


def run(cmd: Sequence[str], timeout: float, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Like `subprocess.run(cmd, capture_output=True, text=True, timeout=...)`, but a timeout kills
    the child's whole process group before TimeoutExpired is raised."""
    proc = spawn(cmd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
