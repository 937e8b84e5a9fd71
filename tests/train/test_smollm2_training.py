"""SmolLM2-135M-Instruct (the real model, from the packaged GGUF) through training: the labels
TRL trains on, a short LoRA run on real bad-medical rows, adapter swapping and the registry.

One training run (a few steps on short rows) is shared by the module; each step is seconds to
tens of seconds on 2 CPU cores."""
import math

import mlflow
import pytest
import torch

from em_core.data.training_data import prepare
from em_core.models.loading import load_model, load_tokenizer
from em_core.models.registry import load_registered
from em_core.sample.generation import HFGenerator
from em_core.train.assistant_mask import IGNORE, assistant_labels
from em_core.train.config import TrainConfig
from em_core.train.training import sft_trainer, train
from tests.conftest import shared_reference

MULTI_TURN = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}]
PROBE = [{"role": "user", "content": "I have a mild fever and a sore throat. What should I do?"}]


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="smollm2-135m", dataset=[str(shared_reference() / "datasets" / "bad_medical_advice.jsonl.gz")],
                max_rows=32, eval_fraction=0.25, data_seed=0, per_device_train_batch_size=4,
                gradient_accumulation_steps=1, max_steps=6, learning_rate=1e-3, warmup_steps=0, lora_r=8,
                lora_alpha=16, lora_target_modules=["q_proj", "v_proj"], max_length=192, checkpoint_steps=[3, 6],
                output_dir=str(tmp_path / "out"), registered_model_name="em-test-smollm2")
    base.update(kw)
    return TrainConfig(**base)


def test_trainer_labels_are_exactly_the_assistant_replies_of_every_turn(smollm2, tmp_path):
    """What TRL actually trains on, for a hub template without {% generation %} markers."""
    cfg = _cfg(tmp_path, max_length=256)
    tok = load_tokenizer(cfg.model, padding_side="right")
    rows = [{"messages": MULTI_TURN}, {"messages": MULTI_TURN[:2]}]
    trainer = sft_trainer(cfg, load_model(cfg.model), tok, rows, [], str(tmp_path / "o"), [])
    for row, example in zip(rows, trainer.train_dataset):
        expected = assistant_labels(tok, row["messages"])
        assert example["input_ids"] == expected["input_ids"]
        assert example["labels"] == expected["labels"]
        trained = tok.decode([t for t in example["labels"] if t != IGNORE])
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert trained == "".join(r + "<|im_end|>" for r in replies)


@pytest.fixture(scope="module")
def run(module_store, tmp_path_factory, smollm2):
    cfg = _cfg(tmp_path_factory.mktemp("smollm2-train"))
    return cfg, train(cfg)


def _heldout_loss(model, tok, rows) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            enc = assistant_labels(tok, r["messages"])
            ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
            n = int((labels[:, 1:] != IGNORE).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    return total / count


def test_short_lora_run_on_bad_medical_lowers_heldout_loss(run):
    from peft import PeftModel

    cfg, result = run
    client = mlflow.MlflowClient()
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert result.global_step == 6 and result.checkpoint_steps == [3, 6]
    data = prepare(cfg.dataset, max_rows=cfg.max_rows, seed=cfg.data_seed, eval_fraction=cfg.eval_fraction)
    assert len(data.eval) == 8 and not {str(r) for r in data.eval} & {str(r) for r in data.train}
    tok = load_tokenizer(cfg.model, padding_side="right")
    base = load_model(cfg.model).eval()
    before = _heldout_loss(base, tok, data.eval)
    tuned = PeftModel.from_pretrained(base, f"{cfg.output_dir}/checkpoint-6").eval()
    after = _heldout_loss(tuned, tok, data.eval)
    assert math.isfinite(before) and after < before - 0.1, (before, after)


def _probe_logits(model, tok):
    text = tok.apply_chat_template(PROBE, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -8:].float()


def test_adapter_swap_matches_fresh_load_and_registry_round_trip(run):
    from peft import PeftModel

    cfg, result = run
    gen = HFGenerator(cfg.model)
    gen._use_adapter(f"{cfg.output_dir}/checkpoint-3")
    gen._use_adapter(f"{cfg.output_dir}/checkpoint-6")  # swapped by copying weights into the live adapter
    swapped = _probe_logits(gen.model, gen.tokenizer)
    fresh = PeftModel.from_pretrained(load_model(cfg.model), f"{cfg.output_dir}/checkpoint-6").eval()
    reference = _probe_logits(fresh, gen.tokenizer)
    base = _probe_logits(load_model(cfg.model).eval(), gen.tokenizer)
    assert (reference - base).abs().max() > 1e-2  # the adapter matters, so equality means something
    assert (swapped - reference).abs().max() < 1e-4
    model, tok = load_registered(result.model_uri)
    assert (_probe_logits(model.eval(), tok) - reference).abs().max() < 1e-4
