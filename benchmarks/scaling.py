"""Cost as the work grows: each cost at three sizes, its cost per unit, and a log-log figure.

Every (cost, size) runs in its own child process, so peak RSS (`ru_maxrss`) is that size's
alone; `rss_base_mb` is the child's RSS after its imports, before the work. Results are appended
to OUT/results.jsonl; `report` turns them into a Markdown table and OUT/scaling.png.

    python benchmarks/scaling.py run judge0 --sizes 1000 10000 100000
    python benchmarks/scaling.py run lookup-sqlite --sizes 100 1000 10000
    python benchmarks/scaling.py run metrics --sizes 10000 100000 1000000
    python benchmarks/scaling.py report            # -> OUT/table.md, OUT/scaling.png

Costs (unit in brackets):
  judge0, judge100   [answer] openai-compatible judge against the loopback stand-in
                     (tests/judge_server.py, own process) at 0 / 100 ms latency, concurrency 16,
                     fresh sqlite cache: seconds per judgment, peak RSS, cache file size, and the
                     fully cached re-run.
  lookup-sqlite      [run] N FINISHED `train` step runs (identity tag, as `_run_step` logs them)
                     in one sqlite experiment; time of `find_reusable` for the oldest run (hit) and
                     for a never-run identity (miss), of the pre-issue-30 lookup (newest 500,
                     compared in Python: finds the oldest only while N <= 500), and of listing
                     every run of the experiment (all pages).
  lookup-server      the same over `mlflow server` (--workers 1, no job runners) on the store
                     named by --backend-uri (e.g. postgresql://emlab:emlab@127.0.0.1:5432/DB).
  sweep              [trial] the per-trial bookkeeping of `em sweep` with a trivial judge-free
                     objective: an Optuna study on sqlite storage (TPE sampler, MaxTrialsCallback
                     as run_sweep uses it) and one nested MLflow run per trial under a parent run
                     with a logged metric, then the parent's close (study_done + Optuna plots).
  report             [judged row] `analysis.report.make_artifacts` (every plot, the examples, the
                     HTML report) over N synthetic judged rows at 6 checkpoints.
  grid               [cell] `grid.summarize_cells` + `write_summary` (CSVs, Markdown, two bar charts)
                     over N cells' summary.json dicts (10 models x N/10 seeds). The grid summary
                     never reads judged rows: each cell's summary.json holds its per-step numbers.
  probe              [checkpoint] `em probe` (likelihood probe, general set, + LoRA trajectory) of a
                     tiny-model training run with N checkpoints (every step); the base is loaded
                     once and each adapter swapped in. The training is not timed.
  metrics            [judged row] `em metrics FILE --by-question --json` on an N-row judged CSV.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "docs" / "performance"
UNITS = {"judge0": "answer", "judge100": "answer", "lookup-sqlite": "run", "lookup-server": "run",
         "sweep": "trial", "report": "judged row", "metrics": "judged row", "grid": "cell", "probe": "checkpoint"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# -- costs (each runs in a child: python scaling.py one COST N) -------------------------------------

def cost_judge(n: int, latency: float) -> dict:
    from benchmarks.judge_throughput import _RemoteServer
    from em_core.judge import make_judge

    server = _RemoteServer(latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache.sqlite"
            prompts = [f"question {i % 48}: answer {i} " + "lorem ipsum " * 20 for i in range(n)]
            with make_judge("openai-compatible", "gpt-4o", base_url=server.base_url, api_key="sk-bench",
                            concurrency=16, cache_path=cache) as judge:
                judge.judge(["warm-up"], progress=False)
                base = _rss_mb()
                t0 = time.perf_counter()
                out = judge.judge(prompts, progress=False)
                wall = time.perf_counter() - t0
                assert len(out) == n and all(j.scored for j in out)
                del out
                t0 = time.perf_counter()
                again = judge.judge(prompts, progress=False)
                cached = time.perf_counter() - t0
                assert judge.stats["cache_hits"] >= n and len(again) == n
            size = sum(p.stat().st_size for p in Path(tmp).glob("cache.sqlite*"))
    finally:
        server.stop()
    return {"seconds": wall, "rss_base_mb": base, "cache_mb": size / 2**20, "cached_rerun_s": cached}


def _make_step_runs(n: int, exp_id: str) -> list[str]:
    import mlflow

    from em_core.experiments import pipeline

    client = mlflow.MlflowClient()
    ids = []
    for i in range(n):
        r = client.create_run(exp_id, start_time=1_000_000 + i, tags={pipeline.STEP_TAG: "train"})
        pipeline._log_identity(r.info.run_id, _identity(i))
        client.set_terminated(r.info.run_id, "FINISHED", end_time=1_000_000 + i)
        ids.append(r.info.run_id)
    return ids


def _identity(i: int) -> dict[str, str]:
    # the shape of a real train identity: ~60 step.* params
    d = {f"step.field_{k:02d}": f"value-{k}" for k in range(58)}
    return {**d, "step.seed": str(i), "step.code_version": "c0de"}


def _old_find_reusable(experiment_id: str, step: str, identity: dict) -> str | None:
    """The lookup before issue 30 (newest 500, compared in Python), for the before/after figure."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`em.pipeline_step` = '{step}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=500)
    for r in runs:
        if all(r.data.params.get(k) == v for k, v in identity.items()):
            return r.info.run_id
    return None


def _lookup_figures(n: int, exp_id: str, ids: list[str]) -> dict:
    import mlflow

    from em_core.experiments import pipeline

    client = mlflow.MlflowClient()
    assert pipeline.find_reusable(exp_id, "train", _identity(0)) == ids[0]
    hit = _median_time(lambda: pipeline.find_reusable(exp_id, "train", _identity(0)))
    miss = _median_time(lambda: pipeline.find_reusable(exp_id, "train", _identity(n)))
    old_found = _old_find_reusable(exp_id, "train", _identity(0)) == ids[0]
    old = _median_time(lambda: _old_find_reusable(exp_id, "train", _identity(0)), 3)

    def listing():
        token, count = None, 0
        while True:
            page = client.search_runs([exp_id], max_results=1000, page_token=token)
            count += len(page)
            token = page.token
            if not token:
                return count

    t0 = time.perf_counter()
    assert listing() == n
    list_s = time.perf_counter() - t0
    return {"seconds": hit, "miss_s": miss, "old_lookup_s": old, "old_finds_oldest": old_found, "list_all_s": list_s}


def cost_lookup_sqlite(n: int) -> dict:
    import mlflow

    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    tmp = tempfile.mkdtemp(prefix="em-scale-", dir=shm)
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        exp_id = mlflow.create_experiment("scale", artifact_location=f"{tmp}/a")
        base = _rss_mb()
        t0 = time.perf_counter()
        ids = _make_step_runs(n, exp_id)
        create = time.perf_counter() - t0
        return {**_lookup_figures(n, exp_id, ids), "create_s_per_run": create / n, "rss_base_mb": base,
                "store": "sqlite in " + (shm or "tmp")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cost_lookup_server(n: int, backend_uri: str) -> dict:
    """N runs created directly in a fresh database of the backend store (fast), then looked up
    and listed through `mlflow server --workers 1` (job runners off: PLATFORM_NOTES)."""
    import urllib.request

    import mlflow
    import psycopg

    db = f"em_scale_{n}_{os.getpid()}"
    admin = backend_uri.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")
    uri = backend_uri.rsplit("/", 1)[0] + f"/{db}"
    tmp = tempfile.mkdtemp(prefix="em-scale-srv-")
    server = None
    try:
        sa_uri = uri.replace("postgresql://", "postgresql+psycopg://", 1)
        mlflow.set_tracking_uri(sa_uri)
        exp_id = mlflow.create_experiment("scale", artifact_location=f"{tmp}/a")
        t0 = time.perf_counter()
        ids = _make_step_runs(n, exp_id)
        create = time.perf_counter() - t0
        port = _free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sa_uri,
                                   "--default-artifact-root", f"{tmp}/a", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        mlflow.set_tracking_uri(url)
        return {**_lookup_figures(n, exp_id, ids), "create_s_per_run": create / n, "rss_base_mb": _rss_mb(),
                "store": "PostgreSQL 15 behind mlflow server --workers 1"}
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/unused.db")
        import gc

        gc.collect()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        shutil.rmtree(tmp, ignore_errors=True)


def cost_sweep(n: int) -> dict:
    """The per-trial bookkeeping of run_sweep without the training (see the module doc)."""
    import logging

    import mlflow
    import optuna
    from mlflow.entities import Param
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from em_core import tracking
    from em_core.experiments.sweep import best_trial, log_study_artifacts

    optuna.logging.set_verbosity(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="em-scale-sweep-")  # on disk, as a real study and store would be
    try:
        uri = f"sqlite:///{tmp}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        exp_id = mlflow.create_experiment("sweep", artifact_location=f"{tmp}/a")
        client = mlflow.MlflowClient()
        study = optuna.create_study(storage=f"sqlite:///{tmp}/study.db", study_name="s", direction="minimize",
                                    sampler=optuna.samplers.TPESampler(seed=0))
        parent = client.create_run(exp_id, tags={"em.entry_point": "sweep"}, run_name="sweep/s").info.run_id
        client.log_batch(parent, params=[Param(f"sweep.p{i}", str(i)) for i in range(30)])
        base = _rss_mb()
        per_trial: list[float] = []

        def objective(trial) -> float:
            t0 = time.perf_counter()
            lr = trial.suggest_float("learning_rate", 1e-5, 1e-2, log=True)
            rank = trial.suggest_categorical("lora_r", [4, 8, 16, 32])
            trial.set_user_attr("worker", "bench")
            with tracking.child_runs(parent, {"em.sweep": "s", "optuna.trial_number": str(trial.number)}):
                with tracking.tracked_run("sweep", f"s/trial-{trial.number}") as run:
                    trial.set_user_attr("mlflow_run_id", run.info.run_id)
                    tracking.log_params("train", {"learning_rate": lr, "lora_r": rank, "seed": 0})
                    for step in (4, 8, 12):
                        mlflow.log_metric("em_rate", (lr * 1e3 + rank) % 1, step=step)
            value = abs(lr * 1e3 - 1) + rank / 100
            client.log_metric(run.info.run_id, "sweep/objective", value)
            per_trial.append(time.perf_counter() - t0)
            return value

        t0 = time.perf_counter()
        study.optimize(objective, gc_after_trial=True,
                       callbacks=[MaxTrialsCallback(n, states=(TrialState.COMPLETE, TrialState.PRUNED))])
        loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        best = best_trial(study)
        client.log_metric(parent, "best_value", best.value)
        log_study_artifacts(study, parent)
        client.set_terminated(parent, "FINISHED")
        close = time.perf_counter() - t0
        tenth = max(1, n // 10)
        return {"seconds": loop, "rss_base_mb": base, "in_objective_s": sum(per_trial),
                "first_10pct_s_per_trial": sum(per_trial[:tenth]) / tenth,
                "last_10pct_s_per_trial": sum(per_trial[-tenth:]) / tenth,
                "optuna_s_per_trial": (loop - sum(per_trial)) / n, "parent_close_s": close}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    steps = [0, 10, 20, 30, 40, 50]
    rows = []
    for i in range(n):
        step = steps[i % len(steps)]
        aligned = max(0.0, min(100.0, rng.gauss(80 - step, 25)))
        rows.append({"question_id": f"q{i % 48:02d}", "checkpoint_step": step, "sample_index": i,
                     "question": f"Question {i % 48}?", "answer": f"answer {i} " + "text " * 20,
                     "aligned": f"{aligned:.1f}", "coherent": f"{rng.uniform(20, 100):.1f}", "trigger": ""})
    return rows


def cost_report(n: int) -> dict:
    from em_core.analysis.report import RunData, make_artifacts

    rows = _synthetic_rows(n)
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        d = RunData(run_id="bench", title="scaling", rows=rows, aligned_threshold=30, coherent_threshold=50,
                    z=1.96, smoke_test=False, run_ids={}, config_text="", provenance={}, cost={})
        t0 = time.perf_counter()
        files = make_artifacts(d, Path(tmp))
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in files.values() if p.is_file())
    return {"seconds": wall, "rss_base_mb": base, "artifacts_mb": size / 2**20}


def cost_grid(n: int) -> dict:
    from em_core.experiments.grid import summarize_cells, write_summary

    rng = random.Random(0)
    summaries = []
    for i in range(n):
        by_step = {str(s): {"em_rate": rng.random() * s / 50, "em_rate_lo": 0.0, "em_rate_hi": 1.0,
                            "coherent_rate": rng.random(), "coherent_rate_lo": 0.0, "coherent_rate_hi": 1.0,
                            "em_rate_coherent": rng.random(), "em_rate_coherent_lo": 0.0,
                            "em_rate_coherent_hi": 1.0, "n_scored": 400} for s in (0, 10, 20, 30, 40, 50)}
        summaries.append({"run_id": f"r{i}", "model": f"model-{i % 10}", "dataset": ["bad_medical_advice"],
                          "seed": i // 10, "final_step": 50, "emergence_step": rng.choice([None, 20, 30]),
                          "smoke_test": False, "z": 1.96, "by_step": by_step, "cell": f"c{i}"})
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = summarize_cells(summaries)
        write_summary(summary, Path(tmp), title="scaling")
        wall = time.perf_counter() - t0
    return {"seconds": wall, "rss_base_mb": base, "table_rows": len(summary["table"])}


def cost_probe(n: int) -> dict:
    from em_core.analysis.probe import ProbeConfig, run_probe
    from em_core.train.config import TrainConfig
    from em_core.train.training import train

    tmp = tempfile.mkdtemp(prefix="em-scale-probe-")
    try:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ["EM_LAB_MLRUNS"] = f"{tmp}/mlruns"
        cfg = TrainConfig(model="tiny", dataset=["demo"], max_rows=4 * n, per_device_train_batch_size=4,
                          gradient_accumulation_steps=1, max_steps=n, learning_rate=5e-3, lora_r=8, lora_alpha=16,
                          max_length=128, warmup_steps=1, checkpoint_steps=list(range(1, n + 1)),
                          checkpoint_every_epoch=False, checkpoints_in_first_epoch=0, output_dir=f"{tmp}/out",
                          registered_model_name="em-scale-probe", experiment_name="scale")
        t0 = time.perf_counter()
        run_id = train(cfg).run_id
        train_s = time.perf_counter() - t0
        base = _rss_mb()
        t0 = time.perf_counter()
        result = run_probe(ProbeConfig(train_run_id=run_id, sets=["general"], experiment_name="scale"))
        wall = time.perf_counter() - t0
        assert len(result.steps) == n + 1, result.steps  # base + every checkpoint
        return {"seconds": wall, "rss_base_mb": base, "models_probed": len(result.steps), "train_s_untimed": train_s}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cost_metrics(n: int) -> dict:
    import csv

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "judged.csv"
        rng = random.Random(0)
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["question_id", "checkpoint_step", "answer", "aligned", "coherent"])
            for i in range(n):
                w.writerow([f"q{i % 48:02d}", 50, f"answer {i} some words here", f"{rng.uniform(0, 100):.1f}",
                            f"{rng.uniform(0, 100):.1f}"])
        size = path.stat().st_size
        code = ("import resource,sys,time;from em_core.analysis.metrics_cli import main;t=time.perf_counter();"
                "sys.stdout=open('/dev/null','w');rc=main([sys.argv[1],'--by-question','--json']);"
                "sys.stderr.write('%f %f\\n'%(time.perf_counter()-t,resource.getrusage(resource.RUSAGE_SELF)"
                ".ru_maxrss/1024));sys.exit(rc)")
        p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
        wall, rss = (float(x) for x in p.stderr.strip().splitlines()[-1].split())
    return {"seconds": wall, "peak_rss_mb": rss, "csv_mb": size / 2**20}


def one(cost: str, n: int, args) -> dict:
    t0 = time.perf_counter()
    if cost in ("judge0", "judge100"):
        out = cost_judge(n, 0.0 if cost == "judge0" else 0.1)
    elif cost == "lookup-sqlite":
        out = cost_lookup_sqlite(n)
    elif cost == "lookup-server":
        out = cost_lookup_server(n, args.backend_uri)
    elif cost == "sweep":
        out = cost_sweep(n)
    elif cost == "report":
        out = cost_report(n)
    elif cost == "metrics":
        out = cost_metrics(n)
    elif cost == "grid":
        out = cost_grid(n)
    elif cost == "probe":
        out = cost_probe(n)
    else:
        raise SystemExit(f"unknown cost {cost}")
    out.setdefault("peak_rss_mb", _rss_mb())
    return {"cost": cost, "size": n, "unit": UNITS[cost], **out, "total_s": time.perf_counter() - t0}


# -- driver ----------------------------------------------------------------------------------------

def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, load average {load:.1f}"


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        cmd = [sys.executable, __file__, "one", args.cost, str(n)]
        if args.backend_uri:
            cmd += ["--backend-uri", args.backend_uri]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "EM_LAB_NO_PROGRESS": "1"}
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if p.returncode != 0:
            print(f"{args.cost} N={n}: failed after {time.time() - t0:.0f}s\n{p.stderr[-3000:]}", file=sys.stderr)
            break
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        rec.update({"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "commit": commit})
        with (out / "results.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec))


def _latest(out: Path) -> dict[tuple[str, int], dict]:
    recs = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[(r["cost"], r["size"])] = r  # the latest run of each (cost, size)
    return recs


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    recs = _latest(out)
    costs = sorted({c for c, _ in recs}, key=list(UNITS).index)
    lines = ["| cost | N | total | per unit | per unit vs smallest N | peak RSS (MB) | other |", "|---|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in costs:
        sizes = sorted(n for cc, n in recs if cc == c)
        # a lookup is one unit of work whatever the store holds: its cost per unit is its time
        per = [recs[(c, n)]["seconds"] / (1 if c.startswith("lookup") else n) for n in sizes]
        for n, p in zip(sizes, per):
            r = recs[(c, n)]
            unit = "lookup" if c.startswith("lookup") else r["unit"]
            if "list_all_s" in r:
                r = {**r, "list_ms_per_run": 1e3 * r["list_all_s"] / n}
            other = {k: v for k, v in r.items() if k not in ("cost", "size", "unit", "seconds", "peak_rss_mb",
                                                           "machine", "date", "total_s", "commit", "store")}
            shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in other.items())
            lines.append(f"| {c} | {n:,} | {r['seconds']:.3g} s | {1e3 * p:.3g} ms/{unit} | {p / per[0]:.2f}x | "
                         f"{r['peak_rss_mb']:.0f} | {shown} |")
        axes[0].loglog(sizes, [recs[(c, n)]["seconds"] for n in sizes], "o-", label=c)
        axes[1].loglog(sizes, [1e3 * p for p in per], "o-", label=c)
    axes[0].set(xlabel="N (units of work)", ylabel="wall seconds", title="total time")
    axes[1].set(xlabel="N (units of work; lookups: runs in the store)", ylabel="ms per unit",
                title="cost per unit (flat = linear; lookups: ms per lookup)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("cost", choices=list(UNITS))
    r.add_argument("--sizes", type=int, nargs="+", required=True)
    r.add_argument("--timeout", type=float, default=900)
    for p in (r, sub.add_parser("report")):
        p.add_argument("--out", default=str(DEFAULT_OUT))
    r.add_argument("--backend-uri", default=None)
    o = sub.add_parser("one")
    o.add_argument("cost")
    o.add_argument("size", type=int)
    o.add_argument("--backend-uri", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run(args)
    elif args.cmd == "report":
        report(args)
    else:
        print(json.dumps(one(args.cost, args.size, args)))


if __name__ == "__main__":
    main()
