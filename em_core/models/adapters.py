"""LoRA adapters as stages of a chain: resolve one by run or registry URI, merge earlier ones.

A stage either continues its parent's adapter (same LoRA, trained further) or merges the
parent's adapter into the base and trains a fresh one on top. In the second case the stage's
model is "base + merged adapters + own adapter"; the ordered list of merged adapters (run
checkpoint URIs) is kept on the training run as tag `em.merged_adapters` and on its registered
version as tag `merged_adapters`, so evaluation and loading rebuild exactly that model.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from em_core import tags as em_tags
from em_core.errors import ConfigError
from em_core.tracking import missing_as

log = logging.getLogger(__name__)

MERGED_TAG = em_tags.MERGED_ADAPTERS
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# Artifact layout of a training run: checkpoints/checkpoint-<step>/ (adapter + trainer state).
CHECKPOINT_ARTIFACT_DIR = "checkpoints"
_CKPT = re.compile(r"checkpoint-(\d+)$")


def step_of(name: str) -> int | None:
    """The training step in a checkpoint folder's name (`.../checkpoint-40` -> 40), else None."""
    m = _CKPT.search(name.rstrip("/"))
    return int(m.group(1)) if m else None


@dataclass
class AdapterRef:
    """One resolved adapter: the base it applies to, what was merged into that base first,
    where its files are locally, and where it came from."""

    base_model: str
    local_dir: str
    uri: str  # runs:/<run id>/checkpoints/checkpoint-<step>
    run_id: str
    step: int
    merged: list[str] = field(default_factory=list)
    registered_name: str | None = None
    registered_version: str | None = None


def merged_of(tags: dict[str, str]) -> list[str]:
    """The merged-adapter chain recorded in a run's (or model version's) tags."""
    raw = tags.get(MERGED_TAG) or tags.get("merged_adapters") or "[]"
    try:
        chain = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"tag {MERGED_TAG} is not a JSON list: {raw[:80]!r}") from None
    return [str(u) for u in chain]


def model_version(uri: str):
    """The registry entry behind `models:/name@alias` or `models:/name/version`."""
    import mlflow
    from mlflow import MlflowClient

    name, sep, rest = uri.removeprefix("models:/").partition("@")
    client = MlflowClient()
    with missing_as(lambda: ConfigError(f"model {uri}: no such registered model version in {mlflow.get_tracking_uri()}")):
        if sep:
            return client.get_model_version_by_alias(name, rest)
        name, _, version = name.partition("/")
        return client.get_model_version(name, version)


def checkpoint_uri(run_id: str, step: int) -> str:
    return f"runs:/{run_id}/{CHECKPOINT_ARTIFACT_DIR}/checkpoint-{step}"


def download_adapter(uri: str, dest: Path) -> str:
    """Only the adapter files of a checkpoint (not its optimizer state) into `dest`."""
    import mlflow

    dest.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        with missing_as(lambda: ConfigError(f"adapter {uri}: it has no {name}")):
            mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/{name}", dst_path=str(dest))
    return str(dest)


def checkpoint_steps(run_id: str) -> list[int]:
    """The steps of the checkpoints a training run logged (`checkpoints/checkpoint-<step>/`): the
    one place that lists them (models.refs.resolve and training's resume use it)."""
    import mlflow

    entries = mlflow.MlflowClient().list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR)
    return sorted(s for s in (step_of(e.path) for e in entries if e.is_dir) if s is not None)





def locate(spec: str):
    """(training run, checkpoint step, registered name, version) that `spec` names, without
    downloading anything. `spec`: a training run id, `runs:/<id>` (its last checkpoint),
    `runs:/<id>/checkpoints/checkpoint-<step>`, or `models:/name@alias` / `models:/name/<version>`."""
    import mlflow

    spec = spec.strip()
    name = version = None
    step: int | None = None
    if spec.startswith("models:/"):
        mv = model_version(spec)
        run_id, name, version = mv.run_id, mv.name, str(mv.version)
    elif spec.startswith("runs:/") or _RUN_ID.match(spec):
        run_id, _, rest = spec.removeprefix("runs:/").partition("/")
        if rest:
            step = step_of(rest)
            if step is None:
                raise ConfigError(f"init_adapter {spec}: expected runs:/<id>/checkpoints/checkpoint-<step>")
    else:
        raise ConfigError(f"init_adapter {spec!r}: give a training run id, runs:/<run id>, or models:/name@alias")
    with missing_as(lambda: ConfigError(f"init_adapter {spec}: run {run_id} not found in {mlflow.get_tracking_uri()}")):
        run = mlflow.MlflowClient().get_run(run_id)
    if not run.data.params.get("train.model"):
        raise ConfigError(f"init_adapter {spec}: run {run_id} is not an em-lab training run (no train.model param)")
    steps = checkpoint_steps(run_id)
    if not steps:
        raise ConfigError(f"init_adapter {spec}: run {run_id} logged no checkpoint")
    if step is None:
        step = steps[-1]  # the final adapter: the last step is always a checkpoint
    elif step not in steps:
        raise ConfigError(f"init_adapter {spec}: no checkpoint at step {step}; the run has {steps}")
    return run, step, name, version


def check_base(spec: str, model: str) -> None:
    """A stage must train on the base its parent adapter was trained on."""
    run, *_ = locate(spec)
    base = run.data.params["train.model"]
    if base != model:
        raise ConfigError(f"init_adapter {spec} was trained on {base!r} but model is {model!r}; set model: {base}")


def resolve_adapter(spec: str, workdir: Path) -> AdapterRef:
    """Locate `spec` (see `locate`) and download its adapter files into `workdir`."""
    run, step, name, version = locate(spec)
    run_id = run.info.run_id
    uri = checkpoint_uri(run_id, step)
    local = download_adapter(uri, workdir / f"{run_id}-{step}")
    return AdapterRef(run.data.params["train.model"], local, uri, run_id, step, merged_of(run.data.tags), name, version)


def merge_into(model, uris: list[str], workdir: Path):
    """`model` with each adapter in `uris` merged into its weights, in order."""
    from peft import PeftModel

    for i, uri in enumerate(uris):
        local = download_adapter(uri, workdir / f"merge-{i}")
        log.info("merging adapter %s into the base", uri)
        model = PeftModel.from_pretrained(model, local).merge_and_unload()
    return model


def registered_version_of_run(run_id: str) -> tuple[str, str] | None:
    """(name, version) of the newest model version registered from `run_id`, if any."""
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return None
    mv = max(versions, key=lambda v: int(v.version))
    return mv.name, str(mv.version)
