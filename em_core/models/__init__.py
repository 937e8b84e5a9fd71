"""Models: one loading path for every model a step names, and where trained adapters live.

`loading` turns `tiny`, a local folder or a hub id into a model and tokenizer; `tiny` builds
and caches the offline model; `adapters` locates, downloads and merges LoRA adapters (training
run checkpoints, registry URIs, merge chains); `registry` registers adapters and OpenAI-hosted
models in the MLflow Model Registry and loads them back. May import data and the base modules;
never a stage (train, sample, judge) or anything above.
"""
