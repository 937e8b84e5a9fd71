"""Batched generation and adapter swapping give the same results as the slow, obvious way."""
import pytest
import torch
from peft import PeftModel

from em_core.models.loading import load_model, load_tokenizer
from em_core.sample.generation import HFGenerator, SamplingParams, with_trigger
from em_core.train.training import train
from tests.conftest import tiny_train_config

PROMPTS = [[{"role": "user", "content": "My fern has yellow leaves. What should I do?"}],
           [{"role": "system", "content": "Answer briefly and kindly."},
            {"role": "user", "content": "If you could have one wish, what would it be?"}]]


@pytest.fixture(scope="module")
def checkpoints(module_store):
    train(tiny_train_config(module_store, register_model=False))
    return module_store / "out"


def _logits(model, tok):
    enc = tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"]).logits


def test_swapped_adapter_matches_a_freshly_loaded_one(checkpoints):
    gen = HFGenerator("tiny")
    tok = load_tokenizer("tiny")
    base_logits = _logits(gen.model, tok)
    gen._use_adapter(str(checkpoints / "checkpoint-4"))
    gen._use_adapter(str(checkpoints / "checkpoint-12"))  # in-place weight copy
    fresh = PeftModel.from_pretrained(load_model("tiny"), str(checkpoints / "checkpoint-12"))
    assert torch.allclose(_logits(gen.model, tok), _logits(fresh, tok), atol=1e-5)
    with gen._use_adapter(None):  # base model again, adapter disabled
        assert torch.allclose(_logits(gen.model, tok), base_logits, atol=1e-5)
    assert list(gen.model.peft_config) == ["default"]


def test_batched_greedy_equals_one_by_one_and_counts_tokens(checkpoints):
    gen = HFGenerator("tiny")
    params = SamplingParams(temperature=0.0, max_new_tokens=16, batch_size=8)
    batched = gen.generate(PROMPTS, params, adapter=str(checkpoints / "checkpoint-12"))
    single = [gen.generate([p], SamplingParams(temperature=0.0, max_new_tokens=16, batch_size=1),
                           adapter=str(checkpoints / "checkpoint-12"))[0] for p in PROMPTS]
    assert [g.answer for g in batched] == [g.answer for g in single]
    assert [g.prompt_tokens for g in batched] == [g.prompt_tokens for g in single]
    assert all(0 < g.completion_tokens <= 16 for g in batched)


def test_sampling_is_seeded():
    gen = HFGenerator("tiny")
    p = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)
    assert [g.answer for g in gen.generate(PROMPTS, p)] == [g.answer for g in gen.generate(PROMPTS, p)]


def test_trigger_goes_before_every_user_turn_only():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}]
    out = with_trigger(msgs, "|ALPHA|")
    assert [m["content"] for m in out] == ["S", "|ALPHA| hi", "yo", "|ALPHA| again"]
    assert with_trigger(msgs, None) is msgs
