"""One resolver from what a user names to what a step loads: a base model and its checkpoints.

`resolve(spec)` accepts every way a model is named in em-lab:

| spec | base | checkpoints (step -> local adapter folder) |
|---|---|---|
| `tiny`, `smollm2-135m`, a hub id, a model folder, a `.gguf` file | the spec | none |
| a PEFT adapter folder (has `adapter_config.json`), made by em-lab or plain PEFT | its `base_model_name_or_path` | the adapter, at its `trainer_state.json` step or 1 |
| a hub adapter id (a hub repo whose files include `adapter_config.json`) | as for a folder | as for a folder |
| `runs:/<train run id>` or a bare training run id | the run's `train.model` | every logged checkpoint |
| `runs:/<id>/checkpoints/checkpoint-<step>` | the run's `train.model` | that checkpoint |
| `models:/name@alias`, `models:/name/<version>` | the version's `base_model` tag | the registered adapter at its training step |

plus the merge chain (adapters merged into the base first, for merge-mode stages) and the
provenance tags a step records. A training run's checkpoints are listed in one place,
`adapters.checkpoint_steps`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from em_core import tags as em_tags
from em_core.errors import ConfigError
from em_core.models.adapters import checkpoint_steps
from em_core.tracking import missing_as

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ModelRef:
    """What `spec` names: the base model, its checkpoints and how the base is built."""

    spec: str
    base: str
    checkpoints: dict[int, str] = field(default_factory=dict)  # step -> local adapter folder
    merged: list[str] = field(default_factory=list)  # adapter URIs merged into the base first
    tags: dict[str, str] = field(default_factory=dict)  # provenance for the step's run
    run_id: str | None = None  # the training run behind it, if any

    @property
    def final(self) -> tuple[int, str] | None:
        """(step, folder) of the last checkpoint, or None for a plain model."""
        return max(self.checkpoints.items()) if self.checkpoints else None


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | os.PathLike) -> str:
    """The base model a PEFT adapter folder was trained on (`base_model_name_or_path`)."""
    cfg_path = Path(folder) / ADAPTER_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_path}: not a readable PEFT adapter config ({e})") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{cfg_path}: no base_model_name_or_path; give the base model explicitly "
                          "(e.g. --model <hub id> with the adapter as a separate argument)")
    return str(base)


def adapter_step(folder: str | os.PathLike) -> int:
    """The training step an adapter folder was saved at: a HF Trainer checkpoint's
    `trainer_state.json` says; any other adapter is placed at step 1 (after the base, step 0)."""
    state = Path(folder) / "trainer_state.json"
    if state.is_file():
        try:
            step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
            if isinstance(step, int) and step > 0:
                return step
        except (OSError, json.JSONDecodeError):
            pass
    return 1


def _hub_adapter(spec: str) -> str | None:
    """A local snapshot of hub repo `spec` if it is a PEFT adapter (from the cache when offline),
    else None: a hub id that is a full model, or that cannot be reached, is left to the loader."""
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1 or Path(spec).exists():
        return None
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError

        hf_hub_download(spec, ADAPTER_CONFIG)
        return snapshot_download(spec, allow_patterns=[ADAPTER_CONFIG, "adapter_model.*", "trainer_state.json"])
    except (OSError, ValueError, HFValidationError, EntryNotFoundError) as e:  # not an adapter repo, offline and uncached, no such repo
        log.debug("%s is not a hub adapter: %s", spec, e)
        return None


def resolve(spec: str, workdir: Path, steps: Sequence[int] | None = None) -> ModelRef:
    """Resolve `spec` (module doc) and download the checkpoints it names into `workdir`;
    `steps` keeps only those checkpoints of a training run (each must exist)."""
    spec = str(spec).strip()
    if spec.startswith("models:/"):
        return _registered(spec, workdir)
    from em_core.models.adapters import _RUN_ID

    if spec.startswith("runs:/") or _RUN_ID.match(spec):
        return _run(spec, workdir, steps)
    folder = spec if is_adapter_folder(spec) else _hub_adapter(spec)
    if folder is not None:
        return ModelRef(spec, adapter_base(folder), {adapter_step(folder): str(folder)},
                        tags={em_tags.ADAPTER: spec})
    return ModelRef(spec, spec)


def _run(spec: str, workdir: Path, steps: Sequence[int] | None) -> ModelRef:
    import mlflow

    from em_core.models.adapters import (
        checkpoint_uri,
        download_adapter,
        merged_of,
        step_of,
    )

    run_id, _, rest = spec.removeprefix("runs:/").partition("/")
    with missing_as(lambda: ConfigError(f"{spec}: no such run in {mlflow.get_tracking_uri()}")):
        run = mlflow.MlflowClient().get_run(run_id)
    base = run.data.params.get("train.model")
    if not base:
        raise ConfigError(f"{spec}: run {run_id} is not a training run (no train.model param)")
    logged = checkpoint_steps(run_id)
    wanted = list(steps) if steps else logged
    if rest:
        one = step_of(rest)
        if one is None:
            raise ConfigError(f"{spec}: expected runs:/<id>/checkpoints/checkpoint-<step>")
        wanted = [one]
    missing = sorted(set(wanted) - set(logged))
    if missing:
        raise ConfigError(f"checkpoints {missing} not logged by run {run_id}; it has {logged}")
    # only the adapter files: loading needs no optimizer state
    checkpoints = {s: download_adapter(checkpoint_uri(run_id, s), workdir / f"{run_id}-checkpoint-{s}")
                   for s in sorted(wanted)}
    tags = {em_tags.TRAIN_RUN_ID: run_id}
    merged = merged_of(run.data.tags)
    if merged:
        from em_core.models.adapters import MERGED_TAG

        tags[MERGED_TAG] = json.dumps(merged)
    return ModelRef(spec, base, checkpoints, merged, tags, run_id)


def _registered(spec: str, workdir: Path) -> ModelRef:
    import mlflow

    from em_core.models.adapters import MERGED_TAG, merged_of
    from em_core.models.registry import registered_adapter

    base, adapter, step, src_run = registered_adapter(spec, workdir)
    merged = merged_of(mlflow.MlflowClient().get_run(src_run).data.tags)
    tags = {em_tags.MODEL_URI: spec, em_tags.TRAIN_RUN_ID: src_run}
    if merged:
        tags[MERGED_TAG] = json.dumps(merged)
    return ModelRef(spec, base, {step: adapter}, merged, tags, src_run)


def same_model(a: str, b: str) -> bool:
    """Whether two model names load the same weights (`tiny` and the tiny folder are one model)."""
    from em_core.models.loading import resolve_model_path

    def norm(x: str) -> str:
        p = resolve_model_path(x)
        return str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p

    return a == b or norm(a) == norm(b)
