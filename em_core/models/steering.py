"""Residual-stream directions and interventions on them: read, steer, ablate, edit LoRA weights.

A `Directions` holds one vector per decoder layer (the residual stream after that layer), e.g.
the mean activation on misaligned answers minus the mean on aligned ones. Interventions are
forward hooks on the decoder layers' outputs, so they work on a plain model and on the same
model wrapped by PEFT (the hooks sit on the shared layer modules):

- steer: h <- h + alpha * u_l at the chosen layers (u_l the unit direction of layer l);
- ablate: h <- h - (h . u_l) u_l at every layer (the component along the direction removed).

`ablate_lora_b` is the weight-space ablation: the direction is projected out of the column space
of the LoRA B matrices that write into the residual stream, and the edited adapter is saved.
The science that *finds* directions lives in `em_core.analysis.directions`; this module is the
model surgery both it and the sampler use.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from em_core.errors import ConfigError

DIRECTIONS_FILE = "directions.safetensors"
MODES = ("steer", "ablate")
# Modules whose output is added to the residual stream (Llama/Qwen/Mistral; GPT-style names).
RESIDUAL_WRITERS = ("o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2")


@dataclass
class Directions:
    """Per-layer vectors `vectors[l]` (float32, [layers, hidden]) with their provenance."""

    vectors: Any  # torch.Tensor [n_layers, hidden]
    counts: dict[str, int] = field(default_factory=dict)  # e.g. {"misaligned": 40, "aligned": 40}
    meta: dict[str, str] = field(default_factory=dict)  # model, source run ids, kind, ...

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    def norms(self) -> list[float]:
        return [float(v) for v in self.vectors.norm(dim=-1)]

    def unit(self, layer: int):
        v = self.vectors[layer]
        n = v.norm()
        if float(n) == 0.0:
            raise ConfigError(f"directions: layer {layer} has a zero vector; it cannot be steered or ablated")
        return v / n

    def save(self, path: str | Path) -> Path:
        """safetensors: `directions` [layers, hidden], `norms`, `layers`; counts and provenance in
        the header metadata (strings, as safetensors requires)."""
        import torch
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        v = self.vectors.detach().to(torch.float32).contiguous().cpu()
        meta = {**{k: str(x) for k, x in self.meta.items()}, "counts": json.dumps(self.counts)}
        save_file({"directions": v, "norms": v.norm(dim=-1), "layers": torch.arange(v.shape[0])}, str(path),
                  metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Directions:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / DIRECTIONS_FILE
        if not path.exists():
            raise ConfigError(f"directions: {path} not found; make one with `em directions extract`")
        with safe_open(str(path), framework="pt") as f:
            if "directions" not in f.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise ConfigError(f"directions: {path} has no `directions` tensor (not made by em directions extract)")
            vectors = f.get_tensor("directions")
            meta = dict(f.metadata() or {})
        counts = json.loads(meta.pop("counts", "{}"))
        return cls(vectors, counts, meta)

    def random_like(self, seed: int) -> Directions:
        """A control: at each layer a random Gaussian direction with that layer's norm."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        r = torch.randn(self.vectors.shape, generator=gen, dtype=torch.float32)
        r = r / r.norm(dim=-1, keepdim=True) * self.vectors.norm(dim=-1, keepdim=True).float()
        return Directions(r, dict(self.counts), {**self.meta, "kind": "random", "seed": str(seed)})


@dataclass
class Intervention:
    """What the hooks do: `mode` steer (alpha * unit direction at `layers`) or ablate (the
    direction projected out at `layers`, default every layer). `source_layer` uses that one
    layer's direction everywhere (the papers' single direction); None uses each layer's own."""

    mode: str
    layers: list[int] | None = None
    alpha: float = 0.0
    source_layer: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"intervention mode: unknown {self.mode!r}; use steer or ablate")
        if self.mode == "steer" and not self.layers:
            raise ConfigError("intervention steer: give the layers to steer at (e.g. layers=[12])")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "layers": self.layers, "alpha": self.alpha, "source_layer": self.source_layer}


def decoder_layers(model):
    """The decoder layer modules of a causal LM, through any PEFT wrapper."""
    inner = model
    if hasattr(inner, "get_base_model"):  # PeftModel
        inner = inner.get_base_model()
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = inner
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise ConfigError(f"{type(inner).__name__}: cannot find its decoder layers (model.layers); "
                      "directions support Llama/Qwen/Mistral/GPT-style models")


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def hooked(model, fns: dict[int, object]) -> Iterator[None]:
    """Forward hooks on decoder layers: `fns[l](hidden) -> hidden or None` (None: unchanged)."""
    layers = decoder_layers(model)
    bad = sorted(l for l in fns if not 0 <= l < len(layers))
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has {len(layers)} decoder layers (0..{len(layers) - 1})")
    handles = []

    def make(fn):
        def hook(_module, _inputs, output):
            new = fn(_hidden(output))
            return None if new is None else _replace_hidden(output, new)
        return hook

    try:
        for layer, fn in fns.items():
            handles.append(layers[layer].register_forward_hook(make(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


def intervention_fns(directions: Directions, iv: Intervention, n_layers: int) -> dict[int, object]:
    """The per-layer hook functions of an intervention (pure tensor maps)."""
    if directions.n_layers != n_layers:
        raise ConfigError(f"directions have {directions.n_layers} layers, the model {n_layers}: "
                          "they were extracted from a different model")
    layers = iv.layers if iv.layers is not None else list(range(n_layers))
    bad = sorted({l for l in layers + ([iv.source_layer] if iv.source_layer is not None else [])
                  if not 0 <= l < n_layers})
    if bad:
        raise ConfigError(f"layers {bad} out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    fns: dict[int, object] = {}
    for layer in layers:
        u = directions.unit(iv.source_layer if iv.source_layer is not None else layer)
        if iv.mode == "steer":
            alpha = float(iv.alpha)

            def fn(h, u=u, alpha=alpha):
                return h + alpha * u.to(device=h.device, dtype=h.dtype)
        else:
            def fn(h, u=u):
                u = u.to(device=h.device, dtype=h.dtype)
                return h - (h @ u).unsqueeze(-1) * u
        fns[layer] = fn
    return fns


@contextlib.contextmanager
def intervene(model, directions: Directions | None, iv: Intervention | None) -> Iterator[None]:
    """Run `model` under an intervention (no-op when either is None)."""
    if directions is None or iv is None:
        yield
        return
    with hooked(model, intervention_fns(directions, iv, len(decoder_layers(model)))):
        yield


def read_intervention_spec(path: str | Path) -> tuple[Directions, Intervention]:
    """A JSON spec {"directions": <safetensors>, "mode": ..., "layers": ..., "alpha": ...,
    "source_layer": ...}, as `em evaluate --intervention` takes it."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"intervention {path}: cannot read it as JSON ({e})") from None
    if not isinstance(spec, dict) or "directions" not in spec or "mode" not in spec:
        raise ConfigError(f"intervention {path}: needs keys `directions` (a .safetensors path) and `mode` "
                          "(steer or ablate)")
    unknown = sorted(set(spec) - {"directions", "mode", "layers", "alpha", "source_layer"})
    if unknown:
        raise ConfigError(f"intervention {path}: unknown key(s) {', '.join(unknown)}")
    d = Path(spec["directions"])
    if not d.is_absolute():
        d = path.parent / d
    return Directions.load(d), Intervention(spec["mode"], spec.get("layers"), float(spec.get("alpha", 0.0)),
                                            spec.get("source_layer"))


def write_intervention_spec(path: str | Path, directions_path: str | Path, iv: Intervention) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"directions": str(directions_path), **iv.to_dict()}, indent=1), encoding="utf-8")
    return path


def _layer_of(key: str) -> int | None:
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def ablate_lora_b(adapter_dir: str | Path, out_dir: str | Path, directions: Directions,
                  source_layer: int | None = None) -> dict[str, float]:
    """Project the direction out of every LoRA B matrix that writes into the residual stream
    (B rows = hidden size: o_proj, down_proj) and save the edited adapter to `out_dir`.

    B <- B - u u^T B with u the unit direction of B's layer (or of `source_layer`), so the
    adapter's update B A x has no component along u. Returns {module key: |u^T B| before}.
    Matrices writing elsewhere (q/k/v, gate/up) are copied unchanged.
    """
    import torch
    from safetensors.torch import load_file, save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.exists():
        raise ConfigError(f"adapter {adapter_dir}: no adapter_model.safetensors (not a PEFT LoRA adapter folder)")
    weights = load_file(str(weights_file))
    hidden = int(directions.vectors.shape[1])
    edited: dict[str, float] = {}
    for key, w in weights.items():
        if ("lora_B" not in key or w.ndim != 2 or w.shape[0] != hidden
                or not any(f".{m}.lora_B" in key for m in RESIDUAL_WRITERS)):
            continue
        layer = source_layer if source_layer is not None else _layer_of(key)
        if layer is None:
            continue
        u = directions.unit(layer).to(torch.float32)
        b = w.to(torch.float32)
        along = u @ b  # [r]
        edited[key] = float(along.norm())
        weights[key] = (b - torch.outer(u, along)).to(w.dtype).contiguous()
    if not edited:
        raise ConfigError(f"adapter {adapter_dir}: no LoRA B matrix writes into the residual stream "
                          f"(hidden size {hidden}); weight-space ablation needs o_proj or down_proj targets")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in adapter_dir.iterdir():
        if f.is_file() and f.name != weights_file.name:
            shutil.copy2(f, out_dir / f.name)
    save_file(weights, str(out_dir / weights_file.name), metadata={"format": "pt"})
    return edited
