"""Sampling: answers from the base model and every checkpoint of a training run.

`generation` holds the backends (HF with adapter swapping, vLLM, OpenAI-compatible APIs);
`evaluation` is the evaluate step (`EvalConfig`): which checkpoints, which questions, and the
answers artifacts it logs. May import models, data and the base; never train or judge.
"""
