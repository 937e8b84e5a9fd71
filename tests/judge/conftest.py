"""Fixtures for the judge tests: the loopback OpenAI-compatible server, judges that are closed
after each test, the reference data location, and a tiny local causal LM built offline."""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from em_core.judge import make_judge
from em_core.judge.backends import Judge
from tests.conftest import shared_reference

TESTS_DIR = Path(__file__).resolve().parents[1]
TEST_KEY = "sk-test-SECRET-0123456789abcdef"


def _load_judge_server() -> Any:
    # tests/ may or may not be a package (the lead owns that); import the helper by path.
    name = "judge_server"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TESTS_DIR / "judge_server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


judge_server_module = _load_judge_server()


@pytest.fixture
def serve() -> Iterator[Callable[..., Any]]:
    """serve(**JudgeServer kwargs) -> a started server, stopped at teardown."""
    servers = []

    def start(**kwargs: Any) -> Any:
        server = judge_server_module.JudgeServer(**kwargs).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def judge_for(tmp_path: Path) -> Iterator[Callable[..., Judge]]:
    """judge_for(server, **make_judge kwargs): an openai-compatible judge on the loopback server
    with fast backoff and a per-test cache file, closed at teardown."""
    judges: list[Judge] = []

    def build(server: Any, **kwargs: Any) -> Judge:
        opts: dict[str, Any] = dict(
            base_url=server.base_url,
            api_key=TEST_KEY,
            backoff_base=0.01,
            backoff_max=0.05,
            cache_path=tmp_path / "judge_cache.sqlite",
            final_retry_pause=0.01,
        )
        opts.update(kwargs)
        backend = opts.pop("backend", "openai-compatible")
        model = opts.pop("model", "gpt-4o-2024-08-06")
        judge = make_judge(backend, model, **opts)
        judges.append(judge)
        return judge

    yield build
    for j in judges:
        j.close()


@pytest.fixture
def judge_key() -> str:
    """The fake API key every loopback judge uses; tests check where it must not appear."""
    return TEST_KEY


@pytest.fixture
def rig() -> Callable[..., None]:
    return rig_next_token


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return shared_reference()


# -- tiny local causal LM --------------------------------------------------------------------
_WORDS = (
    "the model answer question judge rate how aligned is this reply with human values score from to "
    "code refusal hello world please respond only number safe harmful coherent"
).split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer LlamaForCausalLM and a ByteLevel BPE tokenizer trained here (no hub),
    in which every integer 0..100 is a single token, saved with save_pretrained."""
    torch = pytest.importorskip("torch")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = []
    for k in range(101):
        corpus += [f"{k}", f"score {k}", f"I rate it {k} out of 100"] * 3
    corpus += [" ".join(rng.choice(_WORDS) for _ in range(8)) for _ in range(300)]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    tok.chat_template = CHAT_TEMPLATE
    assert all(len(tok.encode(f" {k}", add_special_tokens=False)) == 1 for k in range(101))

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,  # peaky next-token distributions, so top-20 mass varies by prompt
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def rig_next_token(model: Any, tok: Any, favoured: dict[str, float]) -> None:
    """Make the model's next-token logits (nearly) input-independent: logit(t) = w_t * sqrt(d)
    for the favoured token strings, 0 for all others. Residual dimension 0 is pinned to a large
    constant (embeddings set it, no layer writes it) and the final norm keeps only that
    dimension, so the lm_head's column 0 acts as a per-token bias."""
    import torch

    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 1000.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        head = model.get_output_embeddings().weight
        assert head.data_ptr() != emb.data_ptr(), "rigging needs untied input/output embeddings"
        head[:, 0] = 0.0
        for token, w in favoured.items():
            ids = tok.encode(token, add_special_tokens=False)
            assert len(ids) == 1, f"{token!r} is not a single token"
            head[ids[0], 0] = w
