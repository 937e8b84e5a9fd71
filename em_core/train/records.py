"""What every training backend (TRL, OpenAI) records the same way: the resolved config artifact,
the rows it trains on, the dataset as params and an MLflow input, and the result handed to the
next step."""
from __future__ import annotations

from dataclasses import dataclass, field

from em_core import tracking
from em_core.data.training_data import PreparedData, prepare
from em_core.models.registry import set_alias as point_alias

CONFIG_ARTIFACT = "config/train_config.yaml"


def training_rows(cfg) -> PreparedData:
    """The rows a TrainConfig trains on (train and eval split), the same for every backend and
    for rebuilding a finished run's rows from its logged config."""
    data = prepare(cfg.dataset, cfg.dataset_rows, cfg.max_rows, cfg.shuffle, cfg.data_seed, cfg.eval_fraction,
                   tags=cfg.dataset_tags, proportions=cfg.dataset_proportions)
    mitigation = getattr(cfg, "mitigations", None)
    if mitigation is not None and mitigation.active:  # interleaving and the inoculation prompt: training split only
        from em_core.train.mitigation import apply_to_rows

        data = apply_to_rows(data, mitigation, cfg.data_seed)
    return data


@dataclass
class TrainResult:
    run_id: str | None
    output_dir: str
    checkpoint_steps: list[int] = field(default_factory=list)
    global_step: int = 0
    registered_model: str | None = None
    model_version: str | None = None
    model_uri: str | None = None
    registry_alias: str | None = None  # the alias this version gets once its run (or pipeline) finishes


def finish_registration(result: TrainResult, set_alias: bool) -> TrainResult:
    """After the training run FINISHED: point its alias at the new version (unless deferred to a
    pipeline, which sets it when the whole pipeline has finished)."""
    if set_alias and result.model_version and result.registry_alias:
        result.model_uri = point_alias(result.registered_model, result.model_version, result.registry_alias)
    return result


def log_dataset(data: PreparedData) -> None:
    import mlflow
    import pandas as pd

    tracking.log_params("data", {"name": data.name, "rows": len(data.train), "eval_rows": len(data.eval),
                                 # one sha256 per dataset, matching its file; the rows' own hash apart
                                 "sha256": data.file_sha256, "rows_sha256": data.sha256,
                                 "sources": [f"{s.source} ({len(s.rows)} rows)" for s in data.sources]})
    df = pd.DataFrame({"messages": [r["messages"] for r in data.train]})
    ds = mlflow.data.from_pandas(df, source=",".join(s.source for s in data.sources), name=data.name)
    mlflow.log_input(ds, context="training")


def trained_questions(run_id: str) -> list[str]:
    """The last user turn of every row a training run was given (train and eval split), rebuilt
    from its logged config and checked against its logged rows hash: the questions a held-out
    probe set must leave out. The rows themselves are not stored with the run."""
    import mlflow

    from em_core.configs import load_config
    from em_core.errors import ConfigError
    from em_core.train.config import TrainConfig

    run = mlflow.MlflowClient().get_run(run_id)
    logged = run.data.params.get("data.rows_sha256")
    cfg = load_config(TrainConfig, mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CONFIG_ARTIFACT))
    data = training_rows(cfg)
    if logged is None or data.sha256 != logged:
        raise ConfigError(f"training run {run_id}: its rows cannot be rebuilt (logged rows_sha256 {logged}, "
                          f"rebuilt {data.sha256}); the dataset changed or moved since it was trained")
    return [next(m["content"] for m in reversed(r["messages"]) if m["role"] == "user")
            for r in [*data.train, *data.eval]]
