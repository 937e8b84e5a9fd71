"""Judge throughput against a loopback OpenAI-compatible server with fixed latency.

Prints wall time over the ideal N * latency / concurrency (1.0 = the judge adds nothing over
the server's latency; target <= 1.3). Each repeat uses a fresh judge and cache, so every prompt
is paid for. The server runs in its own process by default, as a real API would: in-process it
competes with the judge for the GIL and the figure measures the stub too (--in-process to see).

    python benchmarks/judge_throughput.py [--n 200] [--latency 0.05] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from em_core.judge import make_judge  # noqa: E402
from tests import judge_server  # noqa: E402  (the loopback stand-in the tests use)


def _serve(conn: Any, latency: float) -> None:
    """Child process: run the server, answer 'count'/'max'/'reset', exit on 'stop'."""
    server = judge_server.JudgeServer(latency=latency).start()
    conn.send(server.base_url)
    while True:
        cmd = conn.recv()
        if cmd == "count":
            conn.send(server.n_requests)
        elif cmd == "max":
            conn.send(server.max_in_flight)
        elif cmd == "reset":
            server.reset_counts()
            conn.send(None)
        else:
            server.stop()
            return


class _RemoteServer:
    def __init__(self, latency: float):
        self._conn, child = mp.Pipe()
        self._proc = mp.get_context("spawn").Process(target=_serve, args=(child, latency), daemon=True)
        self._proc.start()
        self.base_url = self._conn.recv()

    def _ask(self, cmd: str) -> Any:
        self._conn.send(cmd)
        return self._conn.recv()

    @property
    def n_requests(self) -> int:
        return self._ask("count")

    @property
    def max_in_flight(self) -> int:
        return self._ask("max")

    def reset_counts(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(timeout=10)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.05)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--in-process", action="store_true", help="run the stub server in this process")
    args = ap.parse_args(argv)

    if args.in_process:
        server = judge_server.JudgeServer(latency=args.latency).start()
    else:
        server = _RemoteServer(args.latency)
    ideal = args.n * args.latency / args.concurrency
    ratios = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeats):
                with make_judge(
                    "openai-compatible",
                    "gpt-4o",
                    base_url=server.base_url,
                    api_key="sk-benchmark",
                    concurrency=args.concurrency,
                    cache_path=Path(tmp) / f"cache{r}.sqlite",
                ) as judge:
                    judge.judge(["warm-up"], progress=False)  # imports and client setup, not timed
                    server.reset_counts()
                    prompts = [f"repeat {r} prompt {i}" for i in range(args.n)]
                    t0 = time.perf_counter()
                    results = judge.judge(prompts, progress=False)
                    wall = time.perf_counter() - t0
                assert len(results) == args.n and all(j.scored for j in results)
                assert server.n_requests == args.n, "every prompt should cost exactly one request"
                ratios.append(wall / ideal)
                print(
                    f"repeat {r}: wall {wall:.3f}s, ideal {ideal:.3f}s, ratio {wall / ideal:.3f}, "
                    f"server max in-flight {server.max_in_flight}"
                )
    finally:
        server.stop()
    ratio = statistics.median(ratios)
    where = "in this process" if args.in_process else "in a separate process"
    print(
        f"judge throughput: N={args.n}, latency={args.latency}s, concurrency={args.concurrency}, server "
        f"{where}: wall/ideal = {ratio:.3f} (median of {args.repeats}; target <= 1.3)"
    )
    return ratio


if __name__ == "__main__":
    main()
