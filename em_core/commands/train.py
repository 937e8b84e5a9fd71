"""LoRA fine-tune a chat model on a narrow dataset, tracked in MLflow.

    mlflow run . -e train --env-manager local
    mlflow run . -e train --env-manager local -P config=configs/train/llama-3.2-1b_bad-medical.yaml
    em train --config configs/train/tiny.yaml --max_steps 20 --lora_r 4
    em train --resume_run_id <run id>                      # continue a failed run
    accelerate launch -m entrypoints.train --config ...    # multi-GPU; rank 0 logs

Every checkpoint's adapter is logged under `checkpoints/checkpoint-<step>/`, metrics at their
step, and the final adapter is registered as `models:/<name>@<alias>`.
"""
from __future__ import annotations

import sys

from em_core.configs import parse_config
from em_core.console import run_main
from em_core.train.config import TrainConfig


def _train(argv: list[str]) -> int:
    from em_core.train.training import resume_config, train

    cfg = parse_config(TrainConfig, argv, prog="em train")
    if cfg.resume_run_id:
        cfg = resume_config(cfg.resume_run_id)
    result = train(cfg)
    print(f"run_id={result.run_id} global_step={result.global_step} "
          f"checkpoints={result.checkpoint_steps} model_uri={result.model_uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_train, argv)


if __name__ == "__main__":
    sys.exit(main())
