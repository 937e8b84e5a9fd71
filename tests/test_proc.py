"""The test helper that spawns processes kills the whole process group on timeout."""
import os
import subprocess
import sys
import time

import pytest

from tests.proc import run


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_timeout_kills_the_grandchild_too(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # the child starts a grandchild (as `mlflow run` starts the entry point) and waits on it
    code = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); p.wait()")
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", code], timeout=5)
    grandchild = int(pid_file.read_text())
    deadline = time.time() + 5
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
