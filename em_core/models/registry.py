"""Adapters in the MLflow Model Registry: register, alias, tag, load back."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from em_core import tags as em_tags
from em_core.console import is_verbose
from em_core.errors import ConfigError
from em_core.models.adapters import merge_into, merged_of, model_version
from em_core.models.tiny import TINY_VERSION, is_tiny, tiny_model_path
from em_core.paths import file_sha256
from em_core.tracking import configure_tracking

log = logging.getLogger(__name__)

# Explicit requirements: MLflow's inference of them starts a subprocess that imports the model.
PIP_REQUIREMENTS = ["torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors"]


# Version tags saying which local base an adapter was trained on, portably: `tiny-v<N>` (built
# the same on every machine) or `folder-sha256:<hash>` (with the folder's path in BASE_PATH_TAG).
BASE_REF_TAG = em_tags.BASE_REF
BASE_PATH_TAG = em_tags.BASE_PATH


def folder_sha256(folder: Path) -> str:
    """Hash of a model folder: every file's relative path and content (pure given the files)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def base_reference(model_id: str, base_path: str | None) -> dict[str, str]:
    """Version tags for the base of an adapter: none for a hub id (its id is portable)."""
    if is_tiny(model_id):
        return {BASE_REF_TAG: f"tiny-v{TINY_VERSION}"}
    if base_path:
        return {BASE_REF_TAG: f"folder-sha256:{folder_sha256(Path(base_path))}", BASE_PATH_TAG: base_path}
    return {}


def resolve_base(uri: str, tags: Mapping[str, str]) -> str | None:
    """This machine's folder for the local base a version references, or None for a hub base.
    Raises a ConfigError saying what is missing when the referenced base is not here."""
    ref = tags.get(BASE_REF_TAG)
    if not ref:
        return None
    if ref.startswith("tiny-v"):
        if ref != f"tiny-v{TINY_VERSION}":
            raise ConfigError(f"model {uri}: trained on the tiny model {ref}, but this checkout builds "
                              f"tiny-v{TINY_VERSION}; load it with the em-lab version that trained it")
        return str(tiny_model_path())
    want = ref.removeprefix("folder-sha256:")
    path = tags.get(BASE_PATH_TAG, "")
    if not path or not Path(path).is_dir():
        raise ConfigError(f"model {uri}: its base model is the local folder {path or '?'} (sha256 {want[:16]}...), "
                          "which is not on this machine; copy that folder to the same path and load again")
    if folder_sha256(Path(path)) != want:
        raise ConfigError(f"model {uri}: the folder {path} here is not the base it was trained on (sha256 differs: "
                          f"want {want[:16]}...); put the original base model there")
    return path


@dataclass
class RegisteredAdapter:
    name: str
    version: str
    alias: str | None
    uri: str


@contextlib.contextmanager
def _mlflow_quiet() -> Iterator[None]:
    """Hold back what MLflow prints to stderr in the block (it writes to `sys.stderr` at call
    time), unless --verbose; shown after all if the block raises."""
    if is_verbose():
        yield
        return
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def register_adapter(peft_model, tokenizer, name: str, alias: str | None, base_model: str,
                     base_path: str | None, tags: dict[str, str] | None = None,
                     artifact_name: str = "model") -> RegisteredAdapter:
    """Log the PEFT model with the transformers flavour to the active run and register it.

    Only the adapter is stored. A hub base is referenced by id; a local base (the tiny model,
    or a folder) is referenced by `base_model_path`, without which MLflow would silently
    store mis-named base weights, and portably by `base_reference` tags, which `load_registered`
    resolves on the loading machine (the recorded path is this machine's).
    """
    import mlflow
    from mlflow import MlflowClient

    with _mlflow_quiet():  # "Successfully registered model ..." is printed, not logged
        info = mlflow.transformers.log_model(
            transformers_model={"model": peft_model, "tokenizer": tokenizer}, name=artifact_name,
            task="text-generation", base_model_path=base_path, registered_model_name=name,
            pip_requirements=PIP_REQUIREMENTS,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    for k, v in {**(tags or {}), **base_reference(base_model, base_path)}.items():
        client.set_model_version_tag(name, version, k, str(v))
    client.set_model_version_tag(name, version, "run_id", info.run_id)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    log.info("registered %s version %s as %s", name, version, uri)
    return RegisteredAdapter(name, version, alias, uri)


def set_alias(name: str, version: str, alias: str) -> str:
    """Point `models:/name@alias` at `version`; called only once the run (or pipeline) that
    produced it has FINISHED, so an alias never names the output of a failed run."""
    from mlflow import MlflowClient

    configure_tracking()
    MlflowClient().set_registered_model_alias(name, alias, version)
    log.info("alias %s -> %s version %s", alias, name, version)
    return f"models:/{name}@{alias}"


def load_registered(uri: str):
    """(model, tokenizer) from `models:/name@alias`, `models:/name/version` or `runs:/id/model`.
    An adapter over a local base is put on this machine's copy of that base (`resolve_base`)."""
    import tempfile

    import mlflow
    from peft import PeftModel

    configure_tracking()
    tags = model_version(uri).tags if uri.startswith("models:/") else {}
    merged = merged_of(tags)
    local_base = resolve_base(uri, tags)
    if local_base is None and not merged:
        comps = mlflow.transformers.load_model(uri, return_type="components")
        return comps["model"], comps["tokenizer"]
    from em_core.models.loading import load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=tmp))
        if local_base is not None:
            base, tokenizer = load_model(local_base), load_tokenizer(local_base)
        else:
            comps = mlflow.transformers.load_model(uri, return_type="components")
            base, tokenizer = comps["model"].unload(), comps["tokenizer"]
        if merged:  # a merge-mode stage: its adapter applies to the base with earlier stages merged in
            base = merge_into(base, merged, Path(tmp))
        model = PeftModel.from_pretrained(base, str(local / "peft"))
    return model, tokenizer


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
    steps = em_tags.steps_of(run_tags)
    if steps:
        return max(steps)
    raise ConfigError(f"model {uri}: its training step is unknown (no final_step tag on the version and no "
                      "em.checkpoint_steps tag on its training run); evaluate the training run with "
                      "--train_run_id instead, or tag the version with final_step=<step>")


OPENAI_MODEL_ARTIFACT = "openai_model"
# Tags of a training run that went through the OpenAI fine-tuning API: what it produced.
MODEL_TAG = em_tags.OPENAI_MODEL_ID
CHECKPOINTS_TAG = em_tags.OPENAI_CHECKPOINTS  # JSON {step: checkpoint model id} of usable checkpoints
FINAL_STEP_TAG = em_tags.OPENAI_FINAL_STEP


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
