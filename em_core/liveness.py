"""Which RUNNING runs are still alive: a heartbeat tag from every run the project starts, and
reaping of runs whose process is gone (`kill -9`, OOM kill, a lost node).

A run started by `tracking.tracked_run` gets `em.process` (host, kernel boot, pid namespace and
pid) and `em.heartbeat` (unix time), refreshed by a daemon thread every
EM_LAB_HEARTBEAT_SECONDS (30). `reap_stale_runs` marks a RUNNING run KILLED, with a reason in
`em.killed_reason` and its last heartbeat as end time, when its process is known dead (same
machine and pid namespace, pid gone) or its heartbeat is older than the grace period
(EM_LAB_STALE_AFTER_SECONDS, default 600). Runs without a heartbeat tag (started by other
tools) are never touched. Base layer: depends on MLflow only.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from em_core import tags as em_tags

log = logging.getLogger(__name__)

HEARTBEAT_TAG = em_tags.HEARTBEAT
PROCESS_TAG = em_tags.PROCESS
KILLED_REASON_TAG = em_tags.KILLED_REASON
DEFAULT_HEARTBEAT_SECONDS = 30.0
DEFAULT_STALE_AFTER_SECONDS = 600.0


def heartbeat_seconds() -> float:
    return float(os.environ.get("EM_LAB_HEARTBEAT_SECONDS") or DEFAULT_HEARTBEAT_SECONDS)


def stale_after_seconds() -> float:
    return float(os.environ.get("EM_LAB_STALE_AFTER_SECONDS") or DEFAULT_STALE_AFTER_SECONDS)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _machine() -> str:
    """Host, kernel boot and pid namespace: a pid means the same process only within all three."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = "?"
    return f"{socket.gethostname()}|{_read('/proc/sys/kernel/random/boot_id')}|{pidns}"


def process_id() -> str:
    return f"{_machine()}|{os.getpid()}"


def _known_dead(process: str | None) -> bool:
    """True only when `process` ran on this machine (and pid namespace) and its pid is gone."""
    if not process or "|" not in process:
        return False
    machine, _, pid = process.rpartition("|")
    if machine != _machine() or "?" in machine.split("|") or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return False
    return _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    stat = _read(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


class Heartbeat:
    """Keeps `em.heartbeat` of one run fresh from a daemon thread until `stop()`."""

    def __init__(self, run_id: str, interval: float | None = None, process: bool = True):
        """`process=False`: beat without claiming the run for this process (`em.process`): for a
        run several processes share (a sweep's parent), whose one worker dying must not make the
        run look dead while the others beat; it goes stale only when every beat has stopped."""
        self.run_id = run_id
        self.process = process
        self.interval = interval if interval is not None else heartbeat_seconds()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        import mlflow

        mlflow.MlflowClient().set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.3f}")

    def start(self) -> Heartbeat:
        import mlflow

        if self.process:
            mlflow.MlflowClient().set_tag(self.run_id, PROCESS_TAG, process_id())
        self.beat()  # synchronously, so the run is never RUNNING without one
        self._thread = threading.Thread(target=self._loop, name=f"em-heartbeat-{self.run_id[:8]}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # noqa: BLE001 -- a busy store must not kill the run; the next beat retries
                log.debug("heartbeat of run %s failed: %s", self.run_id, e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _search_all(client, experiment_ids: list[str], filter_string: str) -> Iterable:
    """Every run matching the filter, page by page (search_runs alone stops silently at
    max_results). The pages are read before any run is changed: a run ended while paging must not
    shift the pages under the reader."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def kill_running_runs(experiment_id: str, parent_run_id: str, reason: str,
                      tags: dict[str, str] | None = None) -> list[str]:
    """Mark every RUNNING descendant of `parent_run_id` (children whose tags include `tags`, and
    all their descendants) KILLED with `reason` in `em.killed_reason`; returns their ids. For a
    launcher whose workers can no longer end their own runs (cancelled or dead Ray tasks)."""
    import mlflow

    client = mlflow.MlflowClient()
    killed, frontier, first = [], [parent_run_id], True
    while frontier:
        parent = frontier.pop()
        filt = f"tags.`mlflow.parentRunId` = '{parent}'"
        for k, v in (tags or {}).items() if first else ():
            filt += f" and tags.`{k}` = '{v}'"
        for run in _search_all(client, [experiment_id], filt):  # every child: a sweep may have > 1000
            frontier.append(run.info.run_id)
            if run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, KILLED_REASON_TAG, reason)
                client.set_terminated(run.info.run_id, "KILLED")
                killed.append(run.info.run_id)
        first = False
    return killed


@dataclass
class Reaped:
    run_id: str
    run_name: str
    reason: str


def stale_reason(tags: dict[str, str], now: float, grace: float) -> str | None:
    """Why a RUNNING run with these tags is dead, or None while it may be alive (pure but for
    the pid probe on this machine)."""
    beat = tags.get(HEARTBEAT_TAG)
    if beat is None:
        return None
    try:
        last = float(beat)
    except ValueError:
        return None
    if _known_dead(tags.get(PROCESS_TAG)):
        return f"process {tags[PROCESS_TAG].rpartition('|')[2]} is gone (last heartbeat {now - last:.0f}s ago)"
    if now - last > grace:
        return f"no heartbeat for {now - last:.0f}s (grace {grace:.0f}s)"
    return None


def reap_stale_runs(experiment_ids: Iterable[str] | None = None, grace: float | None = None) -> list[Reaped]:
    """Mark dead RUNNING runs (in these experiments, default all) KILLED with a reason."""
    import mlflow
    from mlflow.entities import ViewType

    client = mlflow.MlflowClient()
    grace = stale_after_seconds() if grace is None else grace
    ids = list(experiment_ids) if experiment_ids is not None else [
        e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    if not ids:
        return []
    reaped = []
    now = time.time()
    for run in _search_all(client, ids, "attributes.status = 'RUNNING'"):
        reason = stale_reason(run.data.tags, now, grace)
        if reason is None:
            continue
        last = float(run.data.tags[HEARTBEAT_TAG])
        client.set_tag(run.info.run_id, KILLED_REASON_TAG, f"stale: {reason}")
        client.set_terminated(run.info.run_id, "KILLED", end_time=int(last * 1000))
        log.warning("run %s (%s) was left RUNNING by a dead process: marked KILLED (%s)",
                    run.info.run_id, run.info.run_name, reason)
        reaped.append(Reaped(run.info.run_id, run.info.run_name, reason))
    return reaped
