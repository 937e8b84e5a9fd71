"""API sampling (OpenAIGenerator) against the loopback OpenAI server: the answer cache knows
which server answered (finding 3)."""
from __future__ import annotations

from em_core.sample.generation import OpenAIGenerator, SamplingParams
from tests.openai_server import OpenAIServer

KEY = "sk-emlab-SAMPLING-0123456789abcdef"
PROMPTS = [[{"role": "user", "content": "Name a plant."}]] * 2 + [[{"role": "user", "content": "Hello?"}]]


def _gen(server: OpenAIServer, cache) -> OpenAIGenerator:
    return OpenAIGenerator("gpt-4o-mini", backend="openai-compatible", base_url=server.base_url, api_key=KEY,
                           cache_path=cache, backoff_base=0.01, backoff_max=0.05)


def test_sample_cache_is_per_server(tmp_path):
    cache = tmp_path / "samples.sqlite"
    with OpenAIServer() as a, OpenAIServer() as b:
        params = SamplingParams(max_new_tokens=16)
        first = _gen(a, cache)
        first.generate(PROMPTS, params)
        first.close()
        again = _gen(a, cache)
        again.generate(PROMPTS, params)
        again.close()
        assert len(a.chat_requests()) == 3 and again.stats["cache_hits"] == 3
        other = _gen(b, cache)
        other.generate(PROMPTS, params)
        other.close()
        assert len(b.chat_requests()) == 3 and other.stats["cache_hits"] == 0


def test_repeats_of_a_prompt_get_their_own_seeds_in_every_sampler(tmp_path):
    """Finding 4: the per-request seed derivation shared by the OpenAI and vLLM samplers (vLLM
    seeds each request; one seed for all made every repeat the same answer)."""
    from em_core.sample.generation import sample_seeds

    a, b = [{"role": "user", "content": "A"}], [{"role": "user", "content": "B"}]
    seeds = sample_seeds([a, a, b, a, b], seed=7)
    assert seeds[0] == seeds[2] == 7  # first occurrences keep the configured seed
    assert len({seeds[0], seeds[1], seeds[3]}) == 3 and seeds[4] == seeds[1]  # k-th repeat: same derived seed
    assert sample_seeds([a, a, b, a, b], seed=7) == seeds and sample_seeds([a, a], seed=8)[1] != seeds[1]
    with OpenAIServer() as server:
        gen = _gen(server, tmp_path / "c.sqlite")
        gen.generate([a, a, b, a, b], SamplingParams(max_new_tokens=4, seed=7))
        gen.close()
        assert sorted(r.body["seed"] for r in server.chat_requests()) == sorted(seeds)  # concurrent: any order
