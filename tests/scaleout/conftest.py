"""One real PostgreSQL database pair and one real `mlflow server --serve-artifacts` on it, shared
by every scale-out test of the session (started once: ~20 s and ~0.5 GB with the light settings).

PostgreSQL comes from `.ci/run` (`.ci/postgres.sh`, URL in EM_LAB_TEST_POSTGRES). Outside CI
(env CI unset) the tests skip with the reason when it is unreachable; in CI they fail."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_URL = "postgresql://emlab:emlab@127.0.0.1:5432/postgres"


def child_env(**extra: str) -> dict[str, str]:
    """Environment for processes the tests spawn: this checkout first, one thread each."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("MLFLOW_RUN_ID", None)
    env.update(extra)
    return env


def spawn(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A child in its own process group (so a timeout kills all of it), output to `log`."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen, sig: int = signal.SIGKILL, grace: float = 10.0) -> None:
    """Signal the child's process group; SIGKILL it if it is not gone within `grace` seconds."""
    for s in (sig, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason} (bash .ci/run installs and starts PostgreSQL)")
    pytest.skip(f"{reason}; run `bash .ci/run` or `bash .ci/postgres.sh` and set EM_LAB_TEST_POSTGRES")


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """URLs of two fresh databases (MLflow's, Optuna's) on the CI PostgreSQL; dropped afterwards."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install 'em-lab[postgres]')")
    admin = os.environ.get("EM_LAB_TEST_POSTGRES", DEFAULT_URL)
    try:
        conn = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.Error as e:
        _unavailable(f"PostgreSQL is not reachable at {admin.split('@')[-1]} ({str(e).strip().splitlines()[0]})")
    names = {k: f"emlab_{k}_{uuid.uuid4().hex[:8]}" for k in ("mlflow", "optuna")}
    for name in names.values():
        conn.execute(f'create database "{name}"')
    base = admin.rsplit("/", 1)[0]
    yield {k: f"{base}/{v}" for k, v in names.items()}
    for name in names.values():
        conn.execute(f'drop database if exists "{name}" with (force)')
    conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB (Linux /proc)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    tree, total, frontier = {pid}, 0, [pid]
    while frontier:
        parent = frontier.pop()
        for p, pp, _ in rows:
            if pp == parent and p not in tree:
                tree.add(p)
                frontier.append(p)
    total = sum(r for p, _, r in rows if p in tree)
    return total / 1024


@pytest.fixture(scope="session")
def mlflow_server(postgres, tmp_path_factory):
    """A real `mlflow server` on PostgreSQL, serving artifacts from a local folder, with the light
    settings of docs/scale-out.md (no job runners, one worker)."""
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    # as docs/scale-out.md starts it: credentials from PGUSER/PGPASSWORD, none in the URL
    from urllib.parse import urlsplit

    url = urlsplit(postgres["mlflow"])
    creds = {k: v for k, v in (("PGUSER", url.username), ("PGPASSWORD", url.password)) if v}
    env = child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **creds)
    bare = url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", bare,
           "--serve-artifacts", "--artifacts-destination", str(tmp / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = spawn(cmd, env, tmp, tmp / "server.log")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            pytest.fail(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    print(f"\nmlflow server up; RSS {rss_mb(proc.pid):.0f} MB", file=sys.stderr)
    yield {"url": url, "pid": proc.pid, "log": tmp / "server.log"}
    stop(proc, signal.SIGTERM)


@pytest.fixture
def server_store(mlflow_server, monkeypatch, tmp_path):
    """Point this test (and its children) at the shared server; artifacts go through its proxy."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server["url"])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("EM_LAB_MLRUNS", str(tmp_path / "mlruns"))  # nothing may land in the checkout
    mlflow.set_tracking_uri(mlflow_server["url"])
    yield mlflow_server
    while mlflow.active_run() is not None:
        mlflow.end_run()


# A throwaway local cluster: no usage stats, and no token auth, which Ray turns on when it finds
# a token in ~/.ray (left by any earlier local `ray.init()`) and then demands from every client.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """A local Ray cluster (2 CPUs) in its own process group, so the tests stop only what they
    started; one for the session (its start and stop take ~20 s)."""
    tmp_path = tmp_path_factory.mktemp("ray")
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'em-lab[ray]')")
    ray_bin = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    temp = tempfile.mkdtemp(prefix="emray")  # short: Ray's unix sockets live under it
    port = 20000 + os.getpid() % 20000
    proc = spawn([ray_bin, "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
                  "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp],
                 child_env(**RAY_ENV), tmp_path, tmp_path / "ray.log")
    time.sleep(1)
    yield f"127.0.0.1:{port}"
    stop(proc, signal.SIGTERM)
    shutil.rmtree(temp, ignore_errors=True)


class PrivatePostgres:
    """A throwaway PostgreSQL server of this test alone (initdb in a temp folder, its own port),
    so stopping and starting it disturbs nobody else using the CI server. Trust auth for
    127.0.0.1; the role is `emlab`, given by PGUSER (no credentials in any URL)."""

    def __init__(self, bindir: Path, root: Path):
        self.bindir, self.root, self.port = bindir, root, _free_port()
        self.data, self.log = root / "data", root / "server.log"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(root, "postgres")
        self._pg("initdb", "-D", str(self.data), "-U", "emlab", "-A", "trust", "--no-sync", "-E", "UTF8")
        self.start()

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_postgres, str(self.bindir / tool), *args], check=True, capture_output=True,
                       timeout=120)

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start", "-o",
                 f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off")

    def stop(self, mode: str = "fast") -> None:
        """`fast`, as `pg_ctlcluster stop` and a restart do: sessions are ended (AdminShutdown)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://127.0.0.1:{self.port}/{db}"


@pytest.fixture
def private_postgres():
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl") or ""]
    if not found[-1] or not os.path.exists(found[-1]):
        _unavailable("PostgreSQL's server binaries (pg_ctl, initdb) are not installed")
    root = Path(tempfile.mkdtemp(prefix="empg"))
    os.chmod(root, 0o755)
    server = PrivatePostgres(Path(found[-1]).parent, root)
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        except Exception:  # already stopped
            pass
        shutil.rmtree(root, ignore_errors=True)
