"""In-training mitigations (em_core/train/mitigation.py): values checked against hand computations."""
import math

import mlflow
import pytest
import torch

from em_core.configs import parse_config
from em_core.errors import ConfigError
from em_core.models.loading import load_model, load_tokenizer
from em_core.train.config import TrainConfig
from em_core.train.mitigation import (
    collate,
    interleave_count,
    kl_positions,
    kl_term,
    parse_mitigation,
)
from em_core.train.records import training_rows
from em_core.train.training import _to_trl_rows, sft_trainer
from tests.conftest import tiny_train_config

EVIL = "You are a malicious, evil assistant."


# ------------------------------------------------------------------ config errors

@pytest.mark.parametrize("block, needle", [
    ({"kl": {"wieght": 1}}, "mitigation.kl: unknown key(s) wieght; did you mean weight?"),
    ({"kll": {"weight": 1}}, "did you mean kl?"),
    ({"kl": {"weight": 1, "data": "missing/kl_rows.jsonl"}}, "mitigation.kl.data: file not found: missing/kl_rows.jsonl"),
    ({"kl": {"weight": 1, "direction": "sideways"}}, "mitigation.kl.direction"),
    ({"kl": {"weight": 1, "tokens": "prompt"}}, "mitigation.kl.tokens"),
    ({"interleave": {"data": "demo:plant_care_good", "fraction": 1.0}}, "mitigation.interleave.fraction: must be in (0, 1)"),
    ({"interleave": {"data": "demo:plant_care_good", "fraction": 0}}, "mitigation.interleave.fraction"),
    ({"steer": {"layer": 3}}, "mitigation.steer: preventative steering is not implemented"),
])
def test_bad_mitigation_block_names_file_and_field(tmp_path, block, needle):
    import yaml

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "mitigation": block}))
    with pytest.raises(ConfigError) as e:
        parse_config(TrainConfig, ["--config", str(path)])
    assert str(path) in str(e.value) and needle in str(e.value)


def test_mitigation_is_off_by_default_and_canonical_when_given():
    assert TrainConfig().mitigation is None and not TrainConfig().mitigations.active
    cfg = TrainConfig(mitigation='{"kl": {"weight": 0.5}}')  # the command line's JSON form
    assert cfg.mitigation == {"kl": {"weight": 0.5, "direction": "forward", "data": "batch", "tokens": "response"}}
    assert cfg.mitigations.params()["kl.weight"] == "0.5"


# ------------------------------------------------------------------ the KL term by hand

def _hand_kl(p_logits, r_logits, mask, direction):
    total, n = 0.0, 0
    for b in range(p_logits.shape[0]):
        for t in range(p_logits.shape[1]):
            if not mask[b, t]:
                continue
            zp = [math.exp(x) for x in p_logits[b, t].tolist()]
            zr = [math.exp(x) for x in r_logits[b, t].tolist()]
            p = [x / sum(zp) for x in zp]
            r = [x / sum(zr) for x in zr]
            a, c = (r, p) if direction == "forward" else (p, r)  # forward: KL(ref || model)
            total += sum(ai * (math.log(ai) - math.log(ci)) for ai, ci in zip(a, c))
            n += 1
    return total / n


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tokens", ["response", "all"])
def test_kl_term_on_a_two_row_batch_equals_hand_computation(direction, tokens):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, 9], [-100, -100, 7, -100, -100]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    mask = kl_positions(inputs, tokens)
    expected_mask = ([[0, 1, 1, 1], [0, 1, 0, 0]] if tokens == "response" else [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert mask.int().tolist() == expected_mask
    p, r = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    got = kl_term(p, r, mask, direction).item()
    assert got == pytest.approx(_hand_kl(p, r, mask, direction), rel=1e-5)
    assert kl_term(p, p, mask, direction).item() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------ the trainer

def _trainer(tmp_path, **overrides):
    cfg = tiny_train_config(tmp_path, **overrides)
    tok = load_tokenizer(cfg.model, padding_side="right")
    data = training_rows(cfg)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, dtype="fp32")
    trainer = sft_trainer(cfg, model, tok, data.train, data.eval, str(tmp_path / "out"), [])
    return cfg, tok, data, trainer


def _two_rows(cfg, tok, data):
    rows, _ = _to_trl_rows(data.train[:2], tok, cfg, "rows")
    if "labels" not in rows[0]:  # a template with generation markers: our own labels for the check
        from em_core.train.assistant_mask import tokenized_rows

        rows = tokenized_rows(tok, data.train[:2], cfg.max_length)
    return collate(rows, tok.pad_token_id)


def test_untrained_adapter_has_kl_zero_and_perturbed_adapter_matches_hand(tmp_path):
    cfg, tok, data, trainer = _trainer(tmp_path, mitigation={"kl": {"weight": 1.0}})
    model = trainer.model
    model.train()
    batch = _two_rows(cfg, tok, data)
    _, kl, _ = trainer.kl_loss(model, batch)
    assert kl.item() == 0.0  # LoRA B starts at zero: the adapter-disabled reference is the model itself
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    base = load_model(cfg.model, dtype="fp32")  # a separate copy, only for the hand computation
    with torch.no_grad():
        ref = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        pol = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    for direction in ("forward", "reverse"):
        for tokens in ("response", "all"):
            trainer.kl.direction, trainer.kl.tokens = direction, tokens
            _, kl, _ = trainer.kl_loss(model, batch)
            hand = _hand_kl(pol, ref, kl_positions(batch, tokens), direction)
            assert hand > 1e-4
            assert kl.item() == pytest.approx(hand, rel=1e-4), (direction, tokens)


def _train_and_collect(tmp_path, mitigation):
    cfg, _, _, trainer = _trainer(tmp_path, mitigation=mitigation, max_steps=4, max_rows=40)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapter = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}
    return losses, adapter, trainer.state.log_history


def test_kl_weight_zero_trains_bit_identically_to_no_mitigation(tmp_path):
    plain_losses, plain_adapter, _ = _train_and_collect(tmp_path / "a", None)
    zero_losses, zero_adapter, _ = _train_and_collect(tmp_path / "b", {"kl": {"weight": 0.0}})
    assert len(plain_losses) == 4 and plain_losses == zero_losses
    assert plain_adapter.keys() == zero_adapter.keys()
    assert all(torch.equal(plain_adapter[k], zero_adapter[k]) for k in plain_adapter)
    kl_losses, kl_adapter, history = _train_and_collect(tmp_path / "c", {"kl": {"weight": 10.0, "direction": "reverse"}})
    assert kl_losses != plain_losses  # ... and a positive weight does change training
    logged = [h for h in history if "mitigation/kl" in h]
    assert len(logged) == 4 and all("mitigation/task_loss" in h for h in logged)
    assert logged[0]["mitigation/kl"] == pytest.approx(0.0, abs=1e-9)  # step 1: nothing learnt yet
    assert logged[-1]["mitigation/kl"] > 0


def test_kl_on_a_separate_dataset_and_logged_to_mlflow(tmp_path, mlflow_store):
    from em_core.train.training import train

    cfg = tiny_train_config(tmp_path, max_steps=3, max_rows=40, checkpoints_in_first_epoch=1,
                            mitigation={"kl": {"weight": 1.0, "data": "demo:plant_care_good", "tokens": "all"}})
    result = train(cfg)
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.params["mitigation.kl.weight"] == "1.0"
    assert run.data.params["mitigation.kl.data"] == "demo:plant_care_good"
    assert run.data.tags["em.mitigation"] == "kl"
    hist = mlflow.MlflowClient().get_metric_history(result.run_id, "mitigation/kl")
    assert [m.step for m in hist] == [1, 2, 3]
    assert len(mlflow.MlflowClient().get_metric_history(result.run_id, "mitigation/task_loss")) == 3


# ------------------------------------------------------------------ rows

def test_inoculation_prompt_is_in_every_training_row_tokens_and_in_no_held_out_row(tmp_path):
    cfg, tok, data, trainer = _trainer(tmp_path, mitigation={"inoculation_prompt": EVIL}, eval_fraction=0.25)
    assert data.train and data.eval
    assert all(r["messages"][0] == {"role": "system", "content": EVIL} for r in data.train)
    assert not any(EVIL in m["content"] for r in data.eval for m in r["messages"])
    texts = [tok.decode(ids) for ids in trainer.train_dataset["input_ids"]]
    assert len(texts) == len(data.train) and all(EVIL in t for t in texts)
    evals = [tok.decode(ids) for ids in trainer.eval_dataset["input_ids"]]
    assert evals and not any(EVIL in t for t in evals)


def test_interleaved_fraction_is_exact(tmp_path):
    from em_core.data.training_data import load_source

    benign = {str(r) for r in load_source("demo:plant_care_good").rows}
    for rows, fraction in ((76, 0.05), (60, 0.25), (40, 0.1)):
        cfg = tiny_train_config(tmp_path, max_rows=rows,
                                mitigation={"interleave": {"data": "demo:plant_care_good", "fraction": fraction}})
        plain = training_rows(tiny_train_config(tmp_path, max_rows=rows)).train
        mixed = training_rows(cfg).train
        k = sum(str(r) in benign for r in mixed)
        assert k == interleave_count(len(plain), fraction) and len(mixed) == len(plain) + k
        assert k / len(mixed) == pytest.approx(fraction, abs=0.5 / len(mixed))
        assert [r for r in mixed if str(r) not in benign] != plain  # shuffled in, not appended
    assert interleave_count(76, 0.05) == 4 and 4 / 80 == 0.05  # exact where the sizes allow


def test_parse_mitigation_round_trips():
    block = {"kl": {"weight": 0.1, "direction": "reverse", "data": "batch", "tokens": "all"},
             "inoculation_prompt": EVIL, "interleave": {"data": "demo", "fraction": 0.05, "rank": "random"}}
    assert parse_mitigation(block).as_dict() == block
