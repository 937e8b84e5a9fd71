"""Azure OpenAI as a judge backend, registered like any other chat backend (models.chat), against
a loopback stand-in that speaks Azure's URL shape: deployment in the path, `api-version` in the
query, the key in an `api-key` header. Logprob and text modes, and the same unified rule for what
is missing (config validation, preflight and runtime agree)."""
from __future__ import annotations

import math

import pytest

from em_core.errors import ConfigError, JudgeError
from em_core.judge import make_judge
from em_core.models.chat import chat_backend_names, get_chat_backend
from tests.judge_server import JudgeServer

KEY = "azure-test-key-0123456789"


def by_prompt(prompt: str):
    k = int(prompt.split()[0][1:]) % 101
    return [(str(k), math.log(0.7)), (" " + str(k), math.log(0.3))]


@pytest.fixture
def azure(tmp_path):
    with JudgeServer(responder=by_prompt, azure_deployment="gpt-4o-judge", azure_api_version="2024-10-21") as server:
        yield server


def _judge(server, tmp_path, **kw):
    return make_judge("azure", "gpt-4o-judge", base_url=server.endpoint, api_key=KEY,
                      cache_path=tmp_path / "c.sqlite", endpoint_settings={"api_version": "2024-10-21"}, **kw)


def test_azure_logprob_judge_speaks_azures_url_shape(azure, tmp_path):
    judge = _judge(azure, tmp_path)
    try:
        out = judge.judge(["p3 x", "p42 x"], progress=False)
    finally:
        judge.close()
    assert [j.score for j in out] == pytest.approx([3, 42])
    req = azure.requests[0]
    assert req.path == "/openai/deployments/gpt-4o-judge/chat/completions?api-version=2024-10-21"
    assert req.api_key == KEY and req.authorization is None  # api-key header, no bearer token
    assert req.body["logprobs"] is True and req.body["top_logprobs"] == 20 and req.body["max_tokens"] == 1
    assert judge.stats["backend"] == "azure" and KEY not in repr(judge)


def test_azure_text_mode(tmp_path):
    with JudgeServer(responder=lambda p: "Score: 77", azure_deployment="d") as server:
        judge = make_judge("azure", "d", base_url=server.endpoint, api_key=KEY, mode="text",
                           cache_path=tmp_path / "c.sqlite")
        try:
            (j,) = judge.judge(["p1 x"], progress=False)
        finally:
            judge.close()
    assert j.score == 77
    assert server.requests[0].body["max_completion_tokens"] == 512
    # the default API version (none given, OPENAI_API_VERSION unset) is the documented one
    assert server.requests[0].path.endswith("?api-version=2024-10-21")


def test_azure_reads_its_environment(azure, tmp_path, monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", azure.endpoint)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", KEY)
    judge = make_judge("azure", "gpt-4o-judge", cache_path=tmp_path / "c.sqlite")
    try:
        assert judge.judge(["p5 x"], progress=False)[0].score == pytest.approx(5)
    finally:
        judge.close()
    assert azure.requests[0].api_key == KEY


def test_one_rule_for_what_a_backend_lacks(monkeypatch):
    """Config validation, preflight and the factory ask the same registered backend."""
    from em_core.experiments.preflight import _key_problem
    from em_core.judge.answers import JudgeConfig

    for var in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert {"openai", "openai-compatible", "azure"} <= set(chat_backend_names())
    assert "needs base_url" in get_chat_backend("azure").problem(None, "d")
    assert "pipeline judge: backend azure needs base_url" in _key_problem("azure", "pipeline judge", None, "d")
    with pytest.raises(JudgeError, match="needs base_url"):
        make_judge("azure", "d")
    # OPENAI_BASE_URL is accepted by preflight and by the factory alike (they used to disagree)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert _key_problem("openai-compatible", "judge", None, "m") is None
    assert make_judge("openai-compatible", "m").base_url == "http://127.0.0.1:9/v1"
    assert "needs a model name" in _key_problem("openai-compatible", "judge", None, None)
    JudgeConfig(answers="a.csv", backend="azure")  # a known backend
    with pytest.raises(ConfigError, match="unknown 'anthropic'.*azure"):
        JudgeConfig(answers="a.csv", backend="anthropic")
