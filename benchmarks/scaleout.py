"""Scale-out figures on this machine: distinct trials with N parallel workers, 1 vs N worker wall
time for the same trials, MLflow server RSS (light settings), Ray grid vs sequential grid.

    bash .ci/postgres.sh        # prints the admin URL
    PYTHONPATH=. python benchmarks/scaleout.py --postgres postgresql://emlab:emlab@127.0.0.1:5432/postgres

Everything is the tiny model with the scale-out tests' settings; each phase gets fresh databases.
Prints figures only: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.scaleout.conftest import child_env, rss_mb, spawn, stop  # noqa: E402
from tests.scaleout.test_scaleout import pipeline_yaml, sweep_yaml  # noqa: E402


def start_server(db: str, tmp: Path) -> tuple:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = spawn([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", db, "--serve-artifacts",
                  "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"], child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), tmp, tmp / "server.log")
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}", time.time() - t0


def run_all(procs: list) -> float:
    t0 = time.time()
    for p in procs:
        p.wait()
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]
    return time.time() - t0


def main() -> None:
    import optuna
    import psycopg

    ap = argparse.ArgumentParser()
    ap.add_argument("--postgres", default=os.environ.get("EM_LAB_TEST_POSTGRES",
                                                         "postgresql://emlab:emlab@127.0.0.1:5432/postgres"))
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--workers", type=int, default=3)
    args = ap.parse_args()
    admin = psycopg.connect(args.postgres, autocommit=True)
    base = args.postgres.rsplit("/", 1)[0]
    dbs = {k: f"embench_{k}_{uuid.uuid4().hex[:6]}" for k in ("mlflow", "optuna")}
    for d in dbs.values():
        admin.execute(f'create database "{d}"')
    tmp = Path(tempfile.mkdtemp(prefix="em-scaleout-"))
    server, url, ready = start_server(f"{base}/{dbs['mlflow']}", tmp)
    fig = {"server_ready_s": round(ready, 1), "server_rss_mb_idle": round(rss_mb(server.pid))}
    env = child_env(MLFLOW_TRACKING_URI=url, EM_LAB_MLRUNS=str(tmp / "mlruns"))
    storage = f"{base}/{dbs['optuna']}"
    try:
        for workers in (1, args.workers):
            study = f"bench-{workers}w"
            cfg = sweep_yaml(tmp, study, storage, n_trials=args.trials)
            procs = [spawn([sys.executable, "-m", "entrypoints.sweep", "--config", str(cfg)], env, tmp,
                           tmp / f"{study}-{i}.log") for i in range(workers)]
            wall = run_all(procs)
            trials = [t for t in optuna.load_study(study_name=study, storage=storage).trials if t.params]
            fig[f"sweep_{workers}w_wall_s"] = round(wall, 1)
            fig[f"sweep_{workers}w_distinct/trials"] = (f"{len({json.dumps(t.params, sort_keys=True) for t in trials})}"
                                                        f"/{len(trials)}")
        fig["server_rss_mb_after_sweeps"] = round(rss_mb(server.pid))
        for launcher in ("local", "ray"):
            grid = tmp / f"bench-grid-{launcher}.yaml"
            import yaml

            grid.write_text(yaml.safe_dump({"name": f"bench-{launcher}", "pipeline_config": str(pipeline_yaml(tmp, "g")),
                                            "models": ["tiny"], "datasets": ["demo", "demo:plant_care_good"],
                                            "seeds": [0], "experiment_name": "bench-grid"}))
            cmd = [sys.executable, "-m", "entrypoints.grid", "--config", str(grid), "--launcher", launcher]
            fig[f"grid_2cells_{launcher}_wall_s"] = round(run_all([spawn(cmd, env, tmp, tmp / f"grid-{launcher}.log")]), 1)
    finally:
        stop(server)
        for d in dbs.values():
            admin.execute(f'drop database if exists "{d}" with (force)')
    print(json.dumps({**fig, "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}, indent=1))


if __name__ == "__main__":
    main()
