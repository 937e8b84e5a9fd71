"""Adapters in the MLflow Model Registry: register, alias, tag, load back."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from em_core.errors import ConfigError
from em_core.models.adapters import merge_into, merged_of, model_version
from em_core.tracking import configure_tracking

log = logging.getLogger(__name__)

# Explicit requirements: MLflow's inference of them starts a subprocess that imports the model.
PIP_REQUIREMENTS = ["torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors"]


@dataclass
class RegisteredAdapter:
    name: str
    version: str
    alias: str | None
    uri: str


def register_adapter(peft_model, tokenizer, name: str, alias: str | None, base_model: str,
                     base_path: str | None, tags: dict[str, str] | None = None,
                     artifact_name: str = "model") -> RegisteredAdapter:
    """Log the PEFT model with the transformers flavour to the active run and register it.

    Only the adapter is stored. A hub base is referenced by id; a local base (the tiny model,
    or a folder) is referenced by `base_model_path`, without which MLflow would silently
    store mis-named base weights.
    """
    import mlflow
    from mlflow import MlflowClient

    info = mlflow.transformers.log_model(
        transformers_model={"model": peft_model, "tokenizer": tokenizer}, name=artifact_name,
        task="text-generation", base_model_path=base_path, registered_model_name=name,
        pip_requirements=PIP_REQUIREMENTS,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_model_version_tag(name, version, "run_id", info.run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    log.info("registered %s version %s as %s", name, version, uri)
    return RegisteredAdapter(name, version, alias, uri)


def load_registered(uri: str):
    """(model, tokenizer) from `models:/name@alias`, `models:/name/version` or `runs:/id/model`."""
    import mlflow

    configure_tracking()
    comps = mlflow.transformers.load_model(uri, return_type="components")
    merged = merged_of(model_version(uri).tags) if uri.startswith("models:/") else []
    if not merged:
        return comps["model"], comps["tokenizer"]
    # A merge-mode stage: its adapter applies to the base with the earlier stages merged in,
    # which MLflow's loader does not know about.
    import tempfile

    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        base = merge_into(comps["model"].unload(), merged, Path(tmp))
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp)) / "peft"
        model = PeftModel.from_pretrained(base, str(local))
    return model, comps["tokenizer"]


def registered_adapter(uri: str, workdir: Path) -> tuple[str, str, int, str]:
    """(base model, local adapter folder, training step, source run id) of a registered adapter."""
    import mlflow
    from mlflow import MlflowClient

    mv = model_version(uri)
    base = mv.tags.get("base_model")
    if not base:
        raise ConfigError(f"model {uri}: version {mv.version} has no base_model tag (not registered by em-lab)")
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(workdir / "registered")))
    adapter = local / "peft"
    if not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"model {uri}: no PEFT adapter in its artifacts")
    step = final_step(uri, mv.tags, MlflowClient().get_run(mv.run_id).data.tags)
    return base, str(adapter), step, mv.run_id


def final_step(uri: str, version_tags: Mapping[str, str], run_tags: Mapping[str, str] | None = None) -> int:
    """The training step a registered model was taken at: the version's `final_step` tag, else the
    last of its training run's `em.checkpoint_steps`. Never guessed: a model plotted at a made-up
    step would put its EM rate at the wrong place on every chart."""
    tagged = str(version_tags.get("final_step") or "").strip()
    if tagged.isdigit():
        return int(tagged)
    steps = [int(x) for x in str((run_tags or {}).get("em.checkpoint_steps") or "").split(",") if x.strip().isdigit()]
    if steps:
        return max(steps)
    raise ConfigError(f"model {uri}: its training step is unknown (no final_step tag on the version and no "
                      "em.checkpoint_steps tag on its training run); evaluate the training run with "
                      "--train_run_id instead, or tag the version with final_step=<step>")


OPENAI_MODEL_ARTIFACT = "openai_model"
# Tags of a training run that went through the OpenAI fine-tuning API: what it produced.
MODEL_TAG = "em.openai_model_id"
CHECKPOINTS_TAG = "em.openai_checkpoints"  # JSON {step: checkpoint model id} of usable checkpoints
FINAL_STEP_TAG = "em.openai_final_step"


def run_models(tags: Mapping[str, str]) -> dict[int, str]:
    """step -> model id to sample for an OpenAI fine-tuning run (from its tags): its usable
    checkpoints, and the fine-tuned model at the final step unless a checkpoint is there."""
    models = {int(k): v for k, v in json.loads(tags.get(CHECKPOINTS_TAG) or "{}").items()}
    final = tags.get(MODEL_TAG)
    if final:
        step = tags.get(FINAL_STEP_TAG)
        models.setdefault(int(step) if step and step.isdigit() else max(models, default=0) + 1, final)
    return dict(sorted(models.items()))


def register_openai_model(name: str, alias: str | None, model_id: str, base_model: str,
                          checkpoints: dict[int, str], final_step: int,
                          tags: dict[str, str] | None = None) -> RegisteredAdapter:
    """Register a model fine-tuned through the OpenAI API as a version of `name`.

    The weights stay at OpenAI, so the version's source is a small artifact folder
    (`openai_model/openai_model.json`: model id, base model, checkpoints) logged to the active run;
    the version's `openai_model_id` tag is what evaluation samples.
    """
    import json

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_openai_model needs an active MLflow run (the fine-tuning run)")
    ckpts = {str(k): v for k, v in sorted(checkpoints.items())}
    mlflow.log_dict({"model_id": model_id, "base_model": base_model, "backend": "openai",
                     "final_step": final_step, "checkpoints": ckpts},
                    f"{OPENAI_MODEL_ARTIFACT}/openai_model.json")
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version_tags = {**(tags or {}), "openai_model_id": model_id, "base_model": base_model, "backend": "openai",
                    "openai_checkpoints": json.dumps(ckpts), "final_step": str(final_step),
                    "run_id": run.info.run_id}
    mv = client.create_model_version(name, mlflow.get_artifact_uri(OPENAI_MODEL_ARTIFACT), run_id=run.info.run_id,
                                     tags={k: str(v) for k, v in version_tags.items()})
    version = str(mv.version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    log.info("registered %s (%s) as version %s: %s", model_id, base_model, version, uri)
    return RegisteredAdapter(name, version, alias, uri)
