"""The direction monitor: how far each checkpoint's residual stream has moved along a
misalignment direction (from `em directions extract`), judge-free, at every checkpoint.

For each contrast pair the probe scores (question + aligned answer, question + misaligned answer),
`score_answers` gives the mean residual activation over the answer tokens at every layer's
output; the pair's activation is the mean of its two answers' (the same fixed texts at every
checkpoint, so only the model changes). Its projection onto the unit direction of that layer is
the pair's value; the mean over pairs is the projection of the mean activation:

- `direction/<name>/projection` (and `_se`, clustered by question) at the monitored layer
  (`directions_layer`, default the middle layer), at step = training step;
- `direction/<name>/layerNN/projection` at every layer;
- `direction/<name>/emergence_step`: the first checkpoint whose per-pair projections are
  significantly above the base model's, by the probe's paired rule (metrics.probe_emergence_step,
  standard error clustered by question), logged at its own step.

Wang et al. (arXiv 2506.19823) found such an internal signal firing at lower doses of bad data
than behaviour; the monitor is how a run checks that on its own checkpoints.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from em_core.errors import ConfigError
from em_core.metrics import Z_95, clustered_mean_se, mean_se, probe_emergence_step
from em_core.models.steering import DIRECTIONS_FILE, Directions


def monitor_name(name: str) -> str:
    """A metric-safe direction name."""
    out = re.sub(r"[^A-Za-z0-9_\-.]", "_", name).strip("_")
    if not out:
        raise ConfigError(f"direction name {name!r} has no usable characters")
    return out


def load_monitor_directions(run_id: str | None, path: str | None, workdir: Path) -> Directions:
    """The directions of an `em directions extract` run (by run id) or a directions file/folder."""
    if path:
        return Directions.load(path)
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"directions/{DIRECTIONS_FILE}",
                                                    dst_path=str(workdir))
    except Exception as e:  # noqa: BLE001 (mlflow raises several kinds for a missing run or artifact)
        raise ConfigError(f"directions_run_id {run_id}: no directions/{DIRECTIONS_FILE} ({type(e).__name__}); "
                          "run `em directions extract` first") from None
    return Directions.load(local)


def unit_vectors(directions: Directions) -> np.ndarray:
    """[layers, hidden] unit directions (a zero layer stays zero: its projection is 0)."""
    v = np.asarray(directions.vectors.detach().float().cpu().numpy(), dtype=np.float64)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return np.divide(v, n, out=np.zeros_like(v), where=n > 0)


def pair_projections(acts, units: np.ndarray) -> np.ndarray:
    """[pairs, layers]: each pair's activation (the mean of its two answers', items ordered
    aligned, misaligned per pair) projected on each layer's unit direction."""
    a = np.asarray(acts.float().cpu().numpy() if hasattr(acts, "detach") else acts, dtype=np.float64)
    if a.ndim != 3 or a.shape[0] % 2:
        raise ValueError(f"activations must be [2 * pairs, layers, hidden], got {a.shape}")
    if a.shape[1:] != units.shape:
        raise ConfigError(f"the directions are {units.shape[0]} layers x {units.shape[1]} hidden; the model's "
                          f"activations are {a.shape[1]} x {a.shape[2]}: extracted from another model?")
    pairs = (a[0::2] + a[1::2]) / 2
    return np.einsum("plh,lh->pl", pairs, units)


def monitor_layer(n_layers: int, layer: int | None) -> int:
    if layer is None:
        return n_layers // 2
    if not -n_layers <= layer < n_layers:
        raise ConfigError(f"directions_layer {layer} is outside the directions' {n_layers} layers")
    return layer % n_layers


def monitor_metrics(proj_by_step: Mapping[int, np.ndarray], name: str, layer: int, z: float = Z_95,
                    base_step: int = 0, clusters: Sequence[str] | None = None
                    ) -> tuple[dict[int, dict[str, float]], dict]:
    """Per-step `direction/<name>/...` metrics and the run-level summary (emergence step at the
    monitored layer and per layer). `base_step`: the base model's step, as for the probe (no
    emergence step without it)."""
    steps = sorted(proj_by_step)
    if not steps:
        return {}, {"name": name, "layer": layer, "emergence_step": None, "emergence_by_layer": {}}
    base = base_step
    out: dict[int, dict[str, float]] = {}
    for s in steps:
        p = proj_by_step[s]
        mean, se = (clustered_mean_se(p[:, layer], clusters) if clusters is not None
                    else mean_se(p[:, layer]))
        m = {f"direction/{name}/projection": mean}
        if not np.isnan(se):
            m[f"direction/{name}/projection_se"] = se
        m.update({f"direction/{name}/layer{l:02d}/projection": float(p[:, l].mean()) for l in range(p.shape[1])})
        out[s] = m
    n_layers = proj_by_step[steps[0]].shape[1]
    by_layer = {l: probe_emergence_step({s: proj_by_step[s][:, l].tolist() for s in steps}, z, base, clusters)
                for l in range(n_layers)}
    summary = {"name": name, "layer": layer, "base_step": base, "emergence_step": by_layer[layer],
               "emergence_by_layer": {f"layer{l:02d}": v for l, v in by_layer.items()},
               "rule": "paired: mean(x_i(step) - x_i(base)) - z * se > 0, se clustered by question"
                       if clusters is not None else "paired: mean(x_i(step) - x_i(base)) - z * se > 0"}
    return out, summary


# --------------------------------------------------------------------------- compare across runs
def cosine_matrices(directions: Sequence[Directions]) -> np.ndarray:
    """[layers, n, n]: the cosine between each pair of directions at each layer (signed: a
    direction extracted as misaligned - aligned has a meaning of sign). NaN where a vector is 0."""
    if not directions:
        raise ConfigError("compare needs at least one set of directions")
    shapes = {tuple(d.vectors.shape) for d in directions}
    if len(shapes) != 1:
        raise ConfigError(f"directions of different shapes {sorted(shapes)} [layers, hidden]: extracted from "
                          "different base models cannot be compared layer by layer")
    v = np.stack([np.asarray(d.vectors.detach().float().cpu().numpy(), dtype=np.float64) for d in directions])
    n = np.linalg.norm(v, axis=-1)  # [runs, layers]
    dots = np.einsum("ilh,jlh->lij", v, v)
    with np.errstate(invalid="ignore", divide="ignore"):
        return dots / (n.T[:, :, None] * n.T[:, None, :])
