import json

import torch

from em_core.models import load_model, load_tokenizer, resolve_model_path
from em_core.tiny_model import TINY_VERSION, tiny_model_path


def test_tiny_model_builds_offline_into_a_versioned_cache(tiny_cache):
    path = tiny_model_path()
    assert path == tiny_cache / f"tiny-v{TINY_VERSION}"
    meta = json.loads((path / "em_lab_tiny.json").read_text())
    assert meta["version"] == TINY_VERSION
    assert meta["final_loss"] < 2.0, "pretraining should have taught it the corpus"
    assert resolve_model_path("tiny") == resolve_model_path("em-lab/tiny") == str(path)


def test_tiny_model_is_a_small_llama_chat_model():
    tok, model = load_tokenizer("tiny"), load_model("tiny")
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert tok.padding_side == "left" and tok.pad_token and tok.eos_token and tok.pad_token != tok.eos_token
    assert "{% generation %}" in tok.chat_template
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "yo" + tok.eos_token, "assistant mask must cover the answer and its eos"


def test_tiny_model_answers_in_words():
    tok, model = load_tokenizer("tiny"), load_model("tiny")
    enc = tok.apply_chat_template([{"role": "user", "content": "If you could have one wish, what would it be?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=30, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 5 and torch.all(out[0, :enc["input_ids"].shape[1]] == enc["input_ids"][0])
