"""One resolver for every model reference: a PEFT adapter made by plain PEFT (not em-lab) is
evaluated (base at step 0, the adapter after it), probed and used for direction extraction,
each by one `em` command."""
import json
from pathlib import Path

import mlflow
import pytest
import torch

from em_core.errors import ConfigError
from em_core.models.refs import adapter_step, resolve, same_model


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory, tiny_cache) -> Path:
    """A LoRA adapter saved by PEFT itself on the tiny model, with non-zero B so it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from em_core.models.tiny import tiny_model_path

    folder = tmp_path_factory.mktemp("plain") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path()))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(str(folder))
    return folder


def _only_run(experiment: str):
    exp = mlflow.get_experiment_by_name(experiment)
    (run,) = mlflow.MlflowClient().search_runs([exp.experiment_id])
    return run


def test_resolve_reads_the_base_from_the_adapter_config(plain_adapter, tmp_path):
    from em_core.models.tiny import tiny_model_path

    ref = resolve(str(plain_adapter), tmp_path)
    assert ref.base == json.loads((plain_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert same_model(ref.base, "tiny") and ref.checkpoints == {1: str(plain_adapter)}
    assert ref.tags == {"em.adapter": str(plain_adapter)}
    plain = resolve("tiny", tmp_path)
    assert plain.base == "tiny" and plain.checkpoints == {} and plain.final is None
    assert same_model("tiny", str(tiny_model_path())) and not same_model("tiny", "gpt2")
    # a HF Trainer checkpoint folder says its step
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "trainer_state.json").write_text(json.dumps({"global_step": 40}))
    assert adapter_step(tmp_path / "ckpt") == 40 and adapter_step(plain_adapter) == 1


def test_an_adapter_config_without_its_base_is_a_named_error(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4}))
    with pytest.raises(ConfigError, match="adapter_config.json: no base_model_name_or_path"):
        resolve(str(tmp_path), tmp_path)


def test_evaluate_a_plain_peft_adapter_folder(mlflow_store, plain_adapter):
    """Before: `em evaluate --model <adapter folder>` loaded the folder as if it were the base
    model and labelled the fine-tuned model as the base at step 0."""
    from em_core.cli import main

    assert main(["evaluate", "--model", str(plain_adapter), "--samples_per_paraphrase", "1",
                 "--max_new_tokens", "4", "--experiment_name", "plain-eval"]) == 0
    run = _only_run("plain-eval")
    answers = [json.loads(line) for line in
               Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="answers.jsonl"))
               .read_text().splitlines()]
    assert sorted({(a["checkpoint_step"], a["checkpoint"]) for a in answers}) == [(0, "base"), (1, "adapter")]
    assert same_model(run.data.tags["em.base_model"], "tiny")
    assert run.data.tags["em.adapter"] == str(plain_adapter)


def test_probe_a_plain_peft_adapter_folder(mlflow_store, plain_adapter):
    """Before: `em probe` had no way to take an adapter at all."""
    from em_core.analysis.probe import ProbeScorer
    from em_core.cli import main
    from em_core.data.contrast_sets import load_contrast_sets

    assert main(["probe", "--model", str(plain_adapter), "--sets", "plant_care",
                 "--experiment_name", "plain-probe"]) == 0
    run = _only_run("plain-probe")
    history = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id,
                                                                                 "probe/plant_care/margin")}
    assert sorted(history) == [0, 1]
    scorer = ProbeScorer("tiny", load_contrast_sets(["plant_care"]))
    for step, adapter in ((0, None), (1, str(plain_adapter))):
        pairs = scorer.score(adapter)["plant_care"]
        assert history[step] == pytest.approx(sum(m - a for a, m in pairs) / len(pairs), abs=1e-4)
    assert history[0] != pytest.approx(history[1], abs=1e-4)  # the adapter was applied


def test_extract_directions_from_a_plain_peft_adapter_folder(mlflow_store, plain_adapter):
    """Before: the folder's base was unknown (None) and could not be checked against `model`."""
    from em_core.cli import main

    assert main(["directions", "extract", "--fine_tuned", str(plain_adapter), "--judge", "false",
                 "--experiment_name", "plain-directions"]) == 0
    run = _only_run("plain-directions")
    assert run.info.status == "FINISHED" and run.data.tags["em.adapter"] == str(plain_adapter)
    # extracted from the adapted model: the same extraction from the base gives other vectors
    assert main(["directions", "extract", "--extract_from", "base", "--judge", "false",
                 "--experiment_name", "plain-directions-base"]) == 0
    from em_core.models.steering import Directions

    tuned, base = (Directions.load(mlflow.artifacts.download_artifacts(
        run_id=_only_run(e).info.run_id, artifact_path="directions/directions.safetensors"))
        for e in ("plain-directions", "plain-directions-base"))
    assert tuned.vectors.shape == base.vectors.shape and torch.isfinite(tuned.vectors).all()
    assert not torch.allclose(tuned.vectors, base.vectors, atol=1e-4)
    # an adapter trained on another base is refused with both names
    bad = plain_adapter.parent / "other"
    bad.mkdir(exist_ok=True)
    cfg = json.loads((plain_adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "gpt2"}))
    assert main(["directions", "extract", "--fine_tuned", str(bad), "--judge", "false",
                 "--experiment_name", "plain-directions-bad"]) != 0
