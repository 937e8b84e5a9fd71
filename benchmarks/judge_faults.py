"""The judge under injected faults: how many runs complete, how many judgments are lost or paid twice.

Each run judges N distinct prompts against the loopback OpenAI-compatible server, which fails
each request with probability --fault-rate (429 or 500, seeded per run). The judge uses its
defaults (6 attempts per request, then one final retry after a pause; the backoff and pause are
shortened here so the script takes seconds, which does not change the counts). Then a re-run
against a healthy server shows what finishing an incomplete run costs.

Prints per run and in total: complete (every prompt has a verdict), lost (api_error records),
duplicated (prompts answered more than once by the server), paid requests over the minimum
(server successes minus N: a failed request is not billed by OpenAI; all attempts shown too),
and how many prompts needed the final retry (without it, such a run lost those prompts).

    python benchmarks/judge_faults.py [--runs 10] [--n 800] [--fault-rate 0.3] [--concurrency 16]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from em_core.judge import API_ERROR, make_judge  # noqa: E402
from tests import judge_server  # noqa: E402  (the loopback stand-in the tests use)


def one_run(server_mod: Any, seed: int, n: int, fault_rate: float, concurrency: int) -> dict[str, int]:
    prompts = [f"run {seed} prompt {i}" for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp, \
            server_mod.JudgeServer(fault_rate=fault_rate, fault_seed=seed) as server:
        opts = dict(base_url=server.base_url, api_key="sk-bench", concurrency=concurrency,
                    cache_path=Path(tmp) / "cache.sqlite", backoff_base=0.002, backoff_max=0.02,
                    final_retry_pause=0.05)
        with make_judge("openai-compatible", "m", **opts) as judge:
            out = judge.judge(prompts, progress=False)
            final_retries = judge.stats["final_retries"]
        answered = Counter(r.body["messages"][-1]["content"] for r in server.requests if r.status == 200)
        lost = sum(j.unscored_reason == API_ERROR for j in out)
        row = {"complete": int(lost == 0), "lost": lost, "duplicated": sum(c - 1 for c in answered.values()),
               "verdicts": sum(j.scored for j in out), "paid_over_min": server.successes - n,
               "attempts": server.n_requests, "final_retries": final_retries}
        # the re-run, against the same server recovered (the cache is per server), pays only for what was lost
        server.fault_rate, before = 0.0, server.n_requests
        with make_judge("openai-compatible", "m", **opts) as judge:
            judge.judge(prompts, progress=False)
        row["rerun_paid"] = server.n_requests - before
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--n", type=int, default=800)
    p.add_argument("--fault-rate", type=float, default=0.3)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    logging.disable(logging.ERROR)  # thousands of retry warnings
    mod = judge_server
    rows = []
    for seed in range(args.runs):
        row = one_run(mod, seed, args.n, args.fault_rate, args.concurrency)
        rows.append(row)
        print(f"run {seed}: " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    tot = {k: sum(r[k] for r in rows) for k in rows[0]}
    print(f"\n{args.runs} runs x {args.n} judgments at {args.fault_rate:.0%} faults: "
          f"completed {tot['complete']}/{args.runs}, lost {tot['lost']}, duplicated {tot['duplicated']}, "
          f"paid requests over the minimum {tot['paid_over_min']} (all attempts incl. failed: "
          f"{tot['attempts']} for {args.runs * args.n} judgments), re-runs paid {tot['rerun_paid']}; "
          f"runs that needed the final retry (would have failed before it): "
          f"{sum(r['final_retries'] > 0 for r in rows)}")


if __name__ == "__main__":
    main()
