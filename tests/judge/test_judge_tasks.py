"""The openai-compatible judge keeps as many asyncio tasks as requests in flight, not one per
prompt (issue 30: 100k answers took ~225 MB more RSS than 10k, mostly pending tasks)."""
from __future__ import annotations

import asyncio

from em_core.judge.backends import OpenAIJudge


def test_tasks_alive_are_bounded_by_concurrency_not_prompts(serve, judge_for, monkeypatch):
    server = serve()
    judge = judge_for(server, concurrency=4)
    seen: list[int] = []
    real = OpenAIJudge._request

    async def counting(self, client, prompt):
        seen.append(len(asyncio.all_tasks()))
        return await real(self, client, prompt)

    monkeypatch.setattr(OpenAIJudge, "_request", counting)
    out = judge.judge([f"prompt {i}" for i in range(300)], progress=False)
    assert len(out) == 300 and all(j.scored for j in out)
    assert server.n_requests == 300  # each prompt exactly once
    assert max(seen) <= 4 + 3, max(seen)  # the workers, plus the driver's own task(s)
