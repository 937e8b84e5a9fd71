"""One loading path for every model: the tiny offline model, `.gguf` files, local folders and hub ids."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from em_core.errors import ConfigError
from em_core.models.gguf import gguf_model_path, is_gguf, is_smollm2, resolve_smollm2
from em_core.models.tiny import is_tiny, tiny_model_path

log = logging.getLogger(__name__)


def resolve_model_path(model_id: str) -> str:
    """What transformers loads for `model_id`: `tiny` -> the cached tiny model folder; a `.gguf`
    file -> its converted, cached folder; `smollm2-135m` -> the hub id online, the packaged GGUF's
    folder offline; anything else (hub id or folder) unchanged."""
    if not model_id or not str(model_id).strip():
        raise ConfigError("model is empty: pass `tiny`, `smollm2-135m`, a hub id such as "
                          "meta-llama/Llama-3.2-1B-Instruct, a local folder or a .gguf file")
    model_id = str(model_id).strip()
    if is_tiny(model_id):
        return str(tiny_model_path())
    if is_smollm2(model_id):
        model_id = resolve_smollm2()
    if is_gguf(model_id):
        return gguf_model_path(model_id)
    return model_id


def model_source(model_id: str) -> str:
    """Where `model_id`'s weights come from, for provenance: `smollm2-135m` is the hub model
    online and a dequantised Q4_1 GGUF offline, which are not the same weights."""
    if is_smollm2(model_id):
        model_id = resolve_smollm2()
    if is_gguf(model_id):
        from em_core.models.gguf import gguf_sha256

        return f"gguf:{Path(model_id).name}@sha256:{gguf_sha256(Path(model_id).expanduser())}"
    return str(model_id)


def local_base_path(model_id: str) -> str | None:
    """The local folder a model is loaded from, or None for a hub id."""
    path = resolve_model_path(model_id)
    return str(Path(path).resolve()) if Path(path).is_dir() else None


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".json", ".model", ".txt")
_FULL_HASH_LIMIT = 64 << 20  # larger files: size + first and last 8 MiB (hashing 16 GB each run is too slow)


def _file_digest(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(8 << 20))
            f.seek(size - (8 << 20))
            h.update(f.read())


def model_fingerprint(model_id: str) -> str:
    """Which weights `model_id` names right now: a content digest of a local folder's weight,
    config and tokenizer files (`tiny` included, so a rebuilt tiny model is a different model),
    the cached commit of a hub id, else the id itself. Keys caches of a model's outputs."""
    import hashlib

    path = Path(resolve_model_path(model_id)).expanduser()
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
            _file_digest(f, h)
        return f"sha256:{h.hexdigest()[:24]}"
    if path.is_file():
        h = hashlib.sha256()
        _file_digest(path, h)
        return f"sha256:{h.hexdigest()[:24]}"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(str(model_id), "config.json")
    except HFValidationError:  # not a hub id either: the id is all we know
        return str(model_id)
    if isinstance(found, str):  # .../snapshots/<commit>/config.json
        return f"{model_id}@{Path(found).parent.name}"
    return str(model_id)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_dtype(name: str = "auto"):
    """bf16 on GPUs that support it, fp32 on CPU (bf16 on CPU is slower, not faster)."""
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[name]
    except KeyError:
        raise ConfigError(f"dtype: unknown value {name!r}; use auto, bf16, fp16 or fp32") from None


def load_tokenizer(model_id: str, padding_side: str = "left"):
    """Tokenizer with a pad token and left padding (decoder-only batched generation needs it)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_id)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ConfigError(_not_found(model_id, e)) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    if not tok.chat_template:
        raise ConfigError(f"model {model_id}: its tokenizer has no chat template; use an instruct/chat model")
    return tok


def load_model(model_id: str, dtype: str = "auto", load_in_4bit: bool = False, device_map=None):
    """A causal LM, optionally 4-bit quantised (QLoRA) with bitsandbytes."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model_id)
    kwargs: dict = {"dtype": pick_dtype(dtype)}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = pick_dtype(dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        if device_map is None and has_cuda():
            device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(_not_found(model_id, e)) from e
    return model


def _not_found(model_id: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (" HF_HUB_OFFLINE=1 is set, so only models already in the local HF cache load;"
            if offline else "")
    return (f"model {model_id!r} could not be loaded: not a local folder and not loadable from the hub."
            f"{hint} use `tiny` or `smollm2-135m` offline, a local folder or a .gguf file. ({type(err).__name__})")
