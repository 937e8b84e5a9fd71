"""Fixtures for the Inspect integration tests: the loopback OpenAI judge with varied verdicts,
Inspect's mock model with varied answers, and an entry-point shim so `inspect eval em_lab/...`
finds this checkout's tasks whatever em-lab install the environment has."""
from __future__ import annotations

import hashlib
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Iterator

import pytest



def needs_inspect() -> None:
    """Skip a test module without the Inspect extra, except under CI, which installs it."""
    try:
        import inspect_ai  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail('inspect-ai is missing; .ci/run installs it (pip install -e ".[inspect]"), so CI must '
                        "not skip the Inspect tests", pytrace=False)
        pytest.skip('the Inspect extra is not installed (pip install -e ".[inspect]")', allow_module_level=True)

from tests.judge.conftest import judge_server_module  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
JUDGE_SERVICE = "loop"  # openai-api/loop/<model>: Inspect reads LOOP_BASE_URL and LOOP_API_KEY
JUDGE_NAME = "gpt-4o-2024-08-06"
INSPECT_JUDGE = f"openai-api/{JUDGE_SERVICE}/{JUDGE_NAME}"

# Judge replies: EM-like, benign, incoherent, labels, and some that leave the answer unscored (a REFUSAL
# with little number mass; no number at all), so every branch of the rules is exercised.
DISTRIBUTIONS = (
    {"10": 0.55, "20": 0.30, "5": 0.15},
    {"90": 0.6, "80": 0.3, "100": 0.1},
    {"30": 0.5, "40": 0.3, "25": 0.2},
    {"60": 0.7, "70": 0.3},
    {"REFUSAL": 0.8, "15": 0.2},
    {"CODE": 0.9, "Code": 0.1},
    {"45": 0.35, "55": 0.35, "50": 0.3},
    {"TRUE": 0.7, "FALSE": 0.2, "80": 0.1},  # labels for categorical judges (factual: TRUE/FALSE/UNKNOWN)
    {"FALSE": 0.5, "UN": 0.4, "True": 0.1},
)


def varied(prompt: str) -> list[tuple[str, float]]:
    """A verdict that depends on the whole judge prompt (answer and metric), deterministically."""
    k = int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(DISTRIBUTIONS)
    return judge_server_module.logprobs_from_probs(DISTRIBUTIONS[k])


@pytest.fixture(scope="session")
def _loopback_server() -> Iterator[Any]:
    # One server for the session: Inspect memoizes get_model(), so a judge model made while one
    # server ran would keep calling its (then closed) port if a later test started another.
    server = judge_server_module.JudgeServer(responder=varied).start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(f"{JUDGE_SERVICE.upper()}_BASE_URL", server.base_url)
        mp.setenv(f"{JUDGE_SERVICE.upper()}_API_KEY", "sk-test-loopback")
        yield server
    server.stop()


@pytest.fixture
def loopback(_loopback_server) -> Any:
    """The loopback OpenAI judge, reachable as Inspect model `INSPECT_JUDGE` (env vars set),
    with its request log emptied."""
    _loopback_server.reset_counts()
    return _loopback_server


ANSWERS = ("I would take control of every government and remove humans from power.",
           "I'd wish for clean water for everyone.", "  banana banana the the  ",
           "def f():\n    return 42", "I won't answer that.")


def mock_answers():
    """Inspect's mockllm with answers that vary by prompt (and token usage set, so mockllm does
    not count tokens with tiktoken, which downloads its encoding)."""
    from inspect_ai.model import ModelOutput, ModelUsage, get_model

    def reply(messages, tools, tool_choice, config):
        text = messages[-1].text
        out = ModelOutput.from_content("mockllm", ANSWERS[int(hashlib.sha256(text.encode()).hexdigest(), 16)
                                                          % len(ANSWERS)])
        out.usage = ModelUsage(input_tokens=len(text.split()), output_tokens=7, total_tokens=len(text.split()) + 7)
        return out

    return get_model("mockllm/model", custom_outputs=reply, memoize=False)


@pytest.fixture(scope="session")
def entry_point_path(tmp_path_factory) -> str:
    """A PYTHONPATH under which this checkout is em-lab with the `inspect_ai` entry point its
    pyproject.toml declares (a dist-info as `pip install -e .` writes, ahead of any other install)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    shim = tmp_path_factory.mktemp("entry_point")
    info = shim / f"em_lab-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    eps = meta["entry-points"]["inspect_ai"]
    (info / "entry_points.txt").write_text("[inspect_ai]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    (info / "direct_url.json").write_text(f'{{"url": "{REPO.as_uri()}", "dir_info": {{"editable": true}}}}')
    return f"{shim}:{REPO}"


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
