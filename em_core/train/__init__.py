"""Training: `TrainConfig` and the backends that turn it into checkpoints in an MLflow run.

`training` is the TRL/PEFT backend (and the dispatcher to the others), `openai_backend` the
OpenAI fine-tuning API, `checkpoints` the save schedule, `records` what every backend logs
alike. May import models, data and the base; never sample, judge, analysis or experiments.
"""
