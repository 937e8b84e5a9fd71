"""Preflight: everything a pipeline (grid cell, sweep trial) will need, checked in seconds before
the first MLflow run exists, so a missing key or a broken question file fails now, not after
hours of training.

Checked: API keys for every chosen backend (train, evaluate, judge), question files fully
validated (paraphrases, judge prompts), datasets resolvable and valid, model ids loadable (the
tiny model, a local folder with config.json, or a hub id that is cached when offline), and the
output store writable. Each problem is listed; one ConfigError reports them all.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from em_core.errors import ConfigError, EmLabError

_KEY_HINT = "export OPENAI_API_KEY=... (or choose backend=local)"


def _key_problem(backend: str, what: str, base_url: str | None = None, model: str | None = "-") -> str | None:
    """What a chat backend lacks (a key, a server address, a model name), by the same rule the
    backend applies when it runs (models.chat); None for local backends."""
    from em_core.models.chat import chat_backend_names, get_chat_backend

    if backend not in chat_backend_names():
        return None
    problem = get_chat_backend(backend).problem(base_url, model)
    if problem is None:
        return None
    hint = f"; {_KEY_HINT}" if backend == "openai" and "OPENAI_API_KEY" in problem else ""
    return f"{what}: {problem}{hint}"


def model_problem(model: str, what: str) -> str | None:
    """None when `model` can be loaded here: `tiny` (built on first use), a local folder with a
    config.json, or a hub id (when HF_HUB_OFFLINE is set: only if it is in the local HF cache)."""
    from em_core.errors import ConfigError
    from em_core.models.gguf import is_gguf, is_smollm2, resolve_smollm2
    from em_core.models.tiny import is_tiny

    if not model or is_tiny(model) or model.startswith(("models:/", "runs:/", "<")):
        return None  # registry/run references are resolved by the step; placeholders are later steps
    if is_smollm2(model):  # the hub model, or offline the packaged GGUF
        try:
            resolve_smollm2()
        except ConfigError as e:
            return f"{what}: {e}"
        return None
    p = Path(model).expanduser()
    if is_gguf(model):
        return None if p.is_file() else f"{what}: GGUF file {model} not found"
    if p.exists() or model.startswith((".", "/", "~")):
        if not (p / "config.json").exists():
            return f"{what}: model folder {model} has no config.json"
        return None
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "config.json"), str):
            return (f"{what}: model {model} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                    "download it on a connected machine (huggingface-cli download) or pass a local folder")
    return None


def store_problem() -> str | None:
    """The tracking store must be writable: for the default sqlite store, its folder."""
    from em_core.paths import mlruns_dir

    uri = os.environ.get("MLFLOW_TRACKING_URI") or ""
    if uri and not uri.startswith("sqlite:///"):
        return None  # a server or database: its own errors are clear and immediate
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri else mlruns_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".em-preflight-"):
            pass
    except OSError as e:
        return f"output store: cannot write to {folder} ({e.strerror or e}); set EM_LAB_MLRUNS or MLFLOW_TRACKING_URI"
    return None


def check_steps(train, evaluate, judge, what: str = "pipeline") -> list[str]:
    """Problems of one train -> evaluate -> judge triple (already parsed configs)."""
    from em_core.data.questions import load_question_sets
    from em_core.train.records import training_rows

    problems: list[str] = []
    train_api = train.backend == "openai"
    for p in (_key_problem("openai" if train_api else "", f"{what} train", train.openai_base_url),
              _key_problem(evaluate.backend, f"{what} evaluate", evaluate.base_url),
              _key_problem(judge.resolved_backend(), f"{what} judge", judge.base_url, judge.judge_model)):
        if p:
            problems.append(p)
    for step, cfg in (("evaluate", evaluate), ("judge", judge)):
        try:
            load_question_sets(cfg.questions, cfg.judges_path)
        except EmLabError as e:
            problems.append(f"{what} {step} questions: {e}")
    try:
        training_rows(train)  # the mix, and a mitigation's interleaved data
    except EmLabError as e:
        problems.append(f"{what} train dataset: {e}")
    if not train_api:
        problems.append(model_problem(train.model, f"{what} train"))
    if judge.resolved_backend() == "local":
        problems.append(model_problem(judge.judge_model or "tiny", f"{what} judge"))
    return [p for p in problems if p]


def preflight(triples: list[tuple], what: str = "pipeline") -> None:
    """Raise one ConfigError listing every problem of these (train, evaluate, judge) triples and
    of the output store; returns quietly when all is ready."""
    seen: set[str] = set()
    problems = []
    for train, evaluate, judge in triples:
        for p in check_steps(train, evaluate, judge, what):
            if p not in seen:
                seen.add(p)
                problems.append(p)
    store = store_problem()
    if store:
        problems.append(store)
    if problems:
        raise ConfigError("preflight failed, nothing was run:\n  - " + "\n  - ".join(problems))
