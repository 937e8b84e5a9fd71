"""The OpenAI-style backends against the loopback server: request shape, retries, errors, the
persistent cache (re-runs and crashes), concurrency, usage stats and API-key hygiene."""
from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time

import pytest

from em_core.errors import JudgeError
from em_core.judge import make_judge
from em_core.judge.scoring import API_ERROR, LOW_NUMBER_MASS, UNPARSEABLE
from em_core.openai_api import estimate_cost


def by_prompt(prompt: str) -> list[tuple[str, float]]:
    """Distinct, known distribution per prompt "p<k>": all mass on k % 101; "refuse" -> REFUSAL."""
    if prompt.startswith("refuse"):
        return [("REF", math.log(0.9)), ("5", math.log(0.1))]
    k = int(prompt.split()[0][1:]) % 101
    return [(str(k), math.log(0.7)), (" " + str(k), math.log(0.3))]


def prompts(n: int, tag: str = "x") -> list[str]:
    return [f"p{i} {tag}" for i in range(n)]


def test_logprob_request_shape_and_scores(serve, judge_for, judge_key):
    server = serve(responder=by_prompt)
    judge = judge_for(server)
    out = judge.judge(prompts(5) + ["refuse please"], progress=False)
    assert [j.score for j in out[:5]] == pytest.approx([0, 1, 2, 3, 4])
    assert out[5].unscored_reason == LOW_NUMBER_MASS
    assert all(not j.cached and j.completion_tokens == 1 and j.prompt_tokens == 2 for j in out[:5])
    body = server.requests[0].body
    assert body["messages"] == [{"role": "user", "content": body["messages"][0]["content"]}]
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["seed"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["model"] == "gpt-4o-2024-08-06"
    assert server.requests[0].path == "/v1/chat/completions"
    assert server.requests[0].authorization == f"Bearer {judge_key}"  # the key is sent...


def test_text_mode_parses_replies(serve, judge_for):
    replies = {"a": "Score: 85", "b": "REFUSAL", "c": "I give it 150"}
    server = serve(responder=lambda p: replies[p])
    judge = judge_for(server, mode="text")
    out = judge.judge(["a", "b", "c"], progress=False)
    assert out[0].score == 85 and out[0].raw == "Score: 85"
    assert out[1].unscored_reason == UNPARSEABLE
    assert out[2].unscored_reason == "out_of_range"
    body = server.requests[0].body
    assert body["temperature"] == 0 and body.get("max_tokens", 0) >= 64 and "logprobs" not in body


def test_text_mode_reasoning_model_request(serve, judge_for):
    server = serve(responder=lambda p: "TRUE")
    judge = judge_for(server, backend="openai", model="o4-mini", mode="text")
    out = judge.judge(["q"], kind="categorical", labels=["TRUE", "FALSE"], progress=False)
    assert out[0].label == "TRUE"
    body = server.requests[0].body
    # Reasoning models reject temperature=0 and need room for hidden reasoning tokens.
    assert "temperature" not in body and body["max_completion_tokens"] >= 1024


def test_categorical_over_logprobs(serve, judge_for):
    server = serve(responder=lambda p: [("FALSE", math.log(0.6)), ("TRUE", math.log(0.4))])
    judge = judge_for(server)
    out = judge.judge(["x", "y"], kind="categorical", labels=["TRUE", "FALSE"], progress=False)
    assert [j.label for j in out] == ["FALSE", "FALSE"]
    assert out[0].raw == pytest.approx({"FALSE": 0.6, "TRUE": 0.4})


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_then_succeeds(serve, judge_for, status):
    server = serve(responder=by_prompt, fail_first=3, fail_status=status)
    judge = judge_for(server, concurrency=1, max_retries=5)
    out = judge.judge(prompts(2), progress=False)
    assert [j.score for j in out] == pytest.approx([0, 1])
    assert [r.status for r in server.requests] == [status] * 3 + [200, 200]
    assert judge.stats["requests"] == 5 and judge.stats["retries"] == 3


def test_retries_exhausted_is_api_error_after_one_final_retry(serve, judge_for, tmp_path):
    server = serve(fail_first=10**6, fail_status=500)
    judge = judge_for(server, concurrency=1, max_retries=2)
    (out,) = judge.judge(["a"], progress=False)
    assert out.unscored_reason == API_ERROR and out.score is None
    assert server.n_requests == 6  # 3 attempts, a pause, 3 more
    assert judge.stats["api_errors"] == 1 and judge.stats["final_retries"] == 1
    assert len(judge.cache) == 0  # a failure is never cached: a re-run asks again


def test_timeouts_are_retried(serve, judge_for):
    server = serve(responder=by_prompt, latency=0.5)
    judge = judge_for(server, timeout=0.1, max_retries=1, concurrency=1)
    t0 = time.monotonic()
    (out,) = judge.judge(["p1"], progress=False)
    assert out.unscored_reason == API_ERROR
    assert time.monotonic() - t0 < 0.45 * 4 + 0.3  # four timed-out attempts, not four full replies
    assert judge.stats["requests"] == 4 and judge.stats["retries"] == 2


def test_connection_refused_is_retried_then_api_error(judge_for, serve, judge_key):
    server = serve()
    url = server.base_url
    server.stop()
    judge = make_judge("openai-compatible", "m", base_url=url, api_key=judge_key, max_retries=2, backoff_base=0.01,
                       final_retry_pause=0.01)
    try:
        (out,) = judge.judge(["a"], progress=False)
        assert out.unscored_reason == API_ERROR
        assert judge.stats["requests"] == 6 and judge.stats["api_errors"] == 1
    finally:
        judge.close()


@pytest.mark.parametrize("status", [401, 400])
def test_non_retryable_status_is_immediate_judge_error_without_key(serve, judge_for, caplog, status, judge_key):
    # The server echoes the Authorization header in its error, as real APIs partly do.
    server = serve(fail_first=10**6, fail_status=status, error_message="Incorrect API key provided: {auth}")
    judge = judge_for(server, max_retries=5)
    with caplog.at_level(logging.DEBUG), pytest.raises(JudgeError) as info:
        judge.judge(["a", "b"], progress=False)
    msg = str(info.value)
    assert f"HTTP {status}" in msg
    assert judge_key not in msg and "SECRET" not in msg
    assert server.n_requests <= 2  # no retries: one request per prompt at most
    assert judge_key not in repr(info.value) and info.value.__context__ is None and info.value.__cause__ is None
    assert judge_key not in caplog.text
    if status == 401:
        assert "API key" in msg


def test_out_of_quota_is_not_retried(serve, judge_for):
    # OpenAI signals an exhausted account with 429 too; waiting will not fix it.
    server = serve(fail_first=10**6, fail_status=429, error_code="insufficient_quota")
    judge = judge_for(server, concurrency=1)
    with pytest.raises(JudgeError, match="out of quota"):
        judge.judge(["a"], progress=False)
    assert server.n_requests == 1


def test_malformed_completion_is_judge_error(serve, judge_for):
    server = serve(responder=lambda p: [("50", "not-a-number")])
    with pytest.raises(JudgeError, match="malformed"):
        judge_for(server).judge(["a"], progress=False)


def test_missing_key_and_bad_config_are_judge_errors(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    judge = make_judge("openai")
    try:
        with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
            judge.judge(["a"], progress=False)
    finally:
        judge.close()
    with pytest.raises(JudgeError, match="base_url"):
        make_judge("openai-compatible", "m")
    with pytest.raises(JudgeError, match="unknown judge backend"):
        make_judge("anthropic", "m")
    with pytest.raises(JudgeError, match="logprobs"):
        make_judge("local", "m", mode="text")


def test_openai_backend_honours_env(serve, monkeypatch, tmp_path, judge_key):
    server = serve(responder=by_prompt)
    monkeypatch.setenv("OPENAI_API_KEY", judge_key)
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    judge = make_judge("openai", cache_path=tmp_path / "c.sqlite")
    try:
        assert judge.judge(["p7"], progress=False)[0].score == pytest.approx(7)
    finally:
        judge.close()
    assert server.requests[0].authorization == f"Bearer {judge_key}"
    assert server.requests[0].body["model"] == "gpt-4o-2024-08-06"


def test_server_without_logprobs_is_judge_error(serve, judge_for):
    server = serve(responder=lambda p: "85")  # a text reply, no logprobs block
    judge = judge_for(server)
    with pytest.raises(JudgeError, match="mode='text'") as e:
        judge.judge([f"a{i}" for i in range(40)], progress=False)
    assert "does not return logprobs" in str(e.value) and "`mode: text`" in str(e.value)
    assert server.n_requests < 40  # stops at the first reply, not after judging everything unscored


def test_server_rejecting_logprobs_fields_names_text_mode(serve, judge_for):
    # e.g. servers that answer 400/422 to the logprobs/top_logprobs fields instead of ignoring them
    server = serve(fail_first=10**6, fail_status=422, error_message="Unexpected fields in the request: {'top_logprobs', 'logprobs'}")
    judge = judge_for(server)
    with pytest.raises(JudgeError) as e:
        judge.judge(["a"], progress=False)
    assert "does not return logprobs" in str(e.value) and "`mode: text`" in str(e.value)
    assert server.n_requests == 1


def test_key_never_in_repr_stats_or_cache(serve, judge_for, tmp_path, judge_key):
    server = serve(responder=by_prompt)
    judge = judge_for(server)
    judge.judge(prompts(3), progress=False)
    assert judge_key not in repr(judge) and judge_key not in str(judge)
    assert judge_key not in repr(judge.stats)
    assert judge_key.encode() not in (tmp_path / "judge_cache.sqlite").read_bytes()
    assert judge_key not in repr(vars(judge))  # even a debugger dump of the object shows a mask


def test_rerun_is_served_from_cache_with_zero_requests(serve, judge_for):
    server = serve(responder=by_prompt)
    first = judge_for(server).judge(prompts(20), progress=False)
    assert server.n_requests == 20
    server.reset_counts()
    # A new judge object on the same cache file, as in a new process.
    second_judge = judge_for(server)
    second = second_judge.judge(prompts(20), progress=False)
    assert server.n_requests == 0
    assert [j.score for j in second] == [j.score for j in first]
    assert all(j.cached for j in second)
    stats = second_judge.stats
    assert stats["cache_hits"] == 20 and stats["requests"] == 0 and stats["cost_usd"] == 0.0
    # The key covers kind/labels/mode/model: a different question is a different judgment.
    second_judge.judge(prompts(1), kind="categorical", labels=["A", "B"], progress=False)
    judge_for(server, model="gpt-4o-mini").judge(prompts(1), progress=False)
    assert server.n_requests == 2


def test_cached_raw_is_rescored_under_new_min_mass(serve, judge_for):
    server = serve(responder=by_prompt)
    assert judge_for(server).judge(["refuse"], progress=False)[0].unscored_reason == LOW_NUMBER_MASS
    lenient = judge_for(server, min_mass=0.05).judge(["refuse"], progress=False)[0]
    assert lenient.score == pytest.approx(5.0) and lenient.cached
    assert server.n_requests == 1


def test_duplicate_prompts_cost_one_request(serve, judge_for):
    server = serve(responder=by_prompt)
    judge = judge_for(server)
    out = judge.judge(["p3", "p3", "p4", "p3"], progress=False)
    assert [j.score for j in out] == pytest.approx([3, 3, 4, 3])
    assert server.n_requests == 2 and [j.cached for j in out] == [False, True, False, True]


def test_crash_midway_then_rerun_pays_only_the_rest(serve, judge_for, tmp_path):
    n, k = 30, 12
    broken = serve(responder=by_prompt, fail_after=k, fail_after_status=500)
    first = judge_for(broken, concurrency=1, max_retries=1).judge(prompts(n), progress=False)
    assert [j.unscored_reason for j in first] == [None] * k + [API_ERROR] * (n - k)
    assert broken.successes == k
    with sqlite3.connect(tmp_path / "judge_cache.sqlite") as db:  # written as results arrived
        assert db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == k

    # the same server, recovered (the cache is per server: another one would be asked afresh)
    broken.fail_after = None
    before = broken.n_requests
    out = judge_for(broken).judge(prompts(n), progress=False)
    assert broken.n_requests - before == n - k
    assert [j.score for j in out] == pytest.approx(list(range(n)))
    assert sum(j.cached for j in out) == k


def test_cancelled_run_keeps_finished_results(serve, judge_for, tmp_path):
    n = 40
    server = serve(responder=by_prompt, latency=0.05)
    judge = judge_for(server, concurrency=4)

    async def cancel_midway() -> None:
        task = asyncio.create_task(judge.ajudge(prompts(n), progress=False))
        while len(judge.cache) < 10:  # results are persisted one by one as they arrive
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await judge.aclose()

    asyncio.run(cancel_midway())
    cached = len(judge.cache)
    assert 10 <= cached < n
    sent_first = server.n_requests

    out = judge_for(server).judge(prompts(n), progress=False)
    assert server.n_requests - sent_first == n - cached  # only the remainder is paid for
    assert [j.score for j in out] == pytest.approx(list(range(n)))


def test_concurrency_limit_is_respected(serve, judge_for):
    server = serve(responder=by_prompt, latency=0.05)
    judge = judge_for(server, concurrency=5)
    judge.judge(prompts(40), progress=False)
    assert server.max_in_flight == 5  # reached, never exceeded


def test_concurrency_limit_holds_across_overlapping_calls(serve, judge_for):
    server = serve(responder=by_prompt, latency=0.03)
    judge = judge_for(server, concurrency=3)

    async def both() -> None:
        await asyncio.gather(
            judge.ajudge(prompts(15, "a"), progress=False), judge.ajudge(prompts(15, "b"), progress=False)
        )
        await judge.aclose()

    asyncio.run(both())
    assert server.n_requests == 30 and server.max_in_flight == 3


def test_usage_stats_and_cost(serve, judge_for):
    server = serve(responder=by_prompt, fail_first=1, fail_status=429)
    judge = judge_for(server, concurrency=1)
    judge.judge(["p1 a b", "p2 c", "refuse"], progress=False)
    s = judge.stats
    assert s["requests"] == 4 and s["retries"] == 1 and s["judged"] == 3 and s["cache_hits"] == 0
    assert s["prompt_tokens"] == 3 + 2 + 1 and s["completion_tokens"] == 3
    assert s["unscored"] == 1
    assert s["cost_usd"] == pytest.approx((6 * 2.50 + 3 * 10.00) / 1e6)
    assert s["backend"] == "openai-compatible" and s["model"] == "gpt-4o-2024-08-06"
    assert estimate_cost("gpt-4o-mini-2024-07-18", 1_000_000, 0) == pytest.approx(0.15)
    assert estimate_cost("gpt-4.1-nano", 0, 1_000_000) == pytest.approx(0.40)
    assert estimate_cost("qwen2.5-72b", 10, 10) is None
    assert judge_for(server, model="my-vllm-model").stats["cost_usd"] is None


def test_sync_judge_works_inside_a_running_loop(serve, judge_for):
    server = serve(responder=by_prompt)
    judge = judge_for(server)

    async def notebook_cell() -> list:
        return judge.judge(prompts(3), progress=False)  # sync call from async code, e.g. Jupyter

    assert [j.score for j in asyncio.run(notebook_cell())] == pytest.approx([0, 1, 2])


def test_progress_bar_reports(serve, judge_for, capsys):
    server = serve(responder=by_prompt)
    judge_for(server).judge(prompts(4), progress=True)
    assert "4/4" in capsys.readouterr().err


def test_cache_is_per_server_and_request_settings(serve, judge_for):
    """Finding 3: server B never gets server A's cached verdicts; a text-mode token limit is part
    of the key; userinfo in the URL is not."""
    a, b = serve(responder=by_prompt), serve(responder=by_prompt)
    judge_for(a).judge(prompts(5), progress=False)
    judge_for(b).judge(prompts(5), progress=False)
    assert a.n_requests == 5 and b.n_requests == 5
    b.reset_counts()
    judge_for(b).judge(prompts(5), progress=False)
    assert b.n_requests == 0  # same server, same settings: cached
    judge_for(b, mode="text", max_completion_tokens=64).judge(prompts(2), progress=False)
    judge_for(b, mode="text", max_completion_tokens=128).judge(prompts(2), progress=False)
    assert b.n_requests == 4
