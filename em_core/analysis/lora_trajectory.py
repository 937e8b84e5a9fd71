"""The geometry of a LoRA adapter across training checkpoints, from its weights alone.

Per adapted module (and aggregated per layer and over the whole adapter), at each checkpoint:
`a_norm`, `b_norm` (Frobenius norms of A and B), `delta_norm` = ||scale * B A||, and the cosine
between the top singular direction of B A (its top left singular vector, the output direction)
at this checkpoint and at the previous one (`cos_prev`) and at the final one (`cos_final`).
Singular vectors have no sign, so cosines are absolute values. Aggregates weight each module's
cosine by its delta_norm; norms aggregate as the root of summed squares.

`rotation_deg` = arccos(cos_prev) of the aggregate. `turn_deg` is the turning angle of the
adapter's path in weight space at a checkpoint (the update that arrived vs the one that leaves);
`transition_step` (logged as `lora_transition_step`) is the checkpoint where it turns most
sharply (docs/probe.md). The accumulated direction (cos_prev) moves slowly once an adapter has
grown, so the path's turn is what marks a change of what training pushes toward. A PCA of the B
weights (all modules flattened, one point per checkpoint) shows the trajectory's shape.

The Model Organisms phase-transition metrics (Turner et al., arXiv 2506.11613; `phase_metrics`):
`local_cos_k<k>` = cos(B_{t-k} - B_t, B_{t+k} - B_t) for k in {5, 10, 15} (a straight path gives
-1; a turn at t raises it toward 0 or above; NaN where either difference is below 0.002 in
Frobenius norm), and `composition` = ||B_t^T B_T|| / (||B_t|| ||B_T||) against the final
checkpoint T (the rank-1 |cosine| generalised to any rank; Frobenius norms). B of several modules
is stacked (sum of B_m^T B'_m), so `all` and each layer are one adapter. k counts training steps
when the checkpoints are evenly spaced every s steps and s divides k (names `local_cos_k<k>`);
otherwise k counts checkpoint intervals and the name says so (`local_cos_k<k>ckpt`). Run-level:
`lora_local_cos_step_k<k>` = the checkpoint with the largest `all` local cosine, and
`lora_composition_step` = the checkpoint after which the composition rises most.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_LAYER = re.compile(r"layers\.(\d+)\.")
_KEY = re.compile(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoraFactors:
    """One module's LoRA factors: delta W = scale * B @ A (A: r x in, B: out x r)."""

    a: np.ndarray
    b: np.ndarray
    scale: float


def _scale(cfg: Mapping, module: str) -> float:
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", r)
    for pattern, value in (cfg.get("rank_pattern") or {}).items():
        if module.endswith(pattern):
            r = value
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if module.endswith(pattern):
            alpha = value
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def load_factors(adapter_dir: str | Path) -> dict[str, LoraFactors]:
    """Module name -> LoRA factors of a PEFT adapter folder (adapter_config.json + safetensors)."""
    from safetensors.numpy import load_file

    folder = Path(adapter_dir)
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = value.astype(np.float64)
    return {name: LoraFactors(p["A"], p["B"], _scale(cfg, name)) for name, p in sorted(parts.items())
            if "A" in p and "B" in p}


def _core(f: LoraFactors) -> tuple[np.ndarray, np.ndarray]:
    """(Q_B, R) with scale * B A = Q_B R Q_A^T: the r x r core R carries every singular value,
    so a large layer costs O(d r^2), never a d x d matrix."""
    qb, rb = np.linalg.qr(f.b)
    _, ra = np.linalg.qr(f.a.T)
    return qb, f.scale * rb @ ra.T


def module_analysis(f: LoraFactors) -> tuple[np.ndarray, dict[str, float]]:
    """(top left singular vector of scale * B A, its statistics) from one small SVD."""
    qb, core = _core(f)
    u, s, _ = np.linalg.svd(core)
    return qb @ u[:, 0], {"a_norm": float(np.linalg.norm(f.a)), "b_norm": float(np.linalg.norm(f.b)),
                          "delta_norm": float(np.linalg.norm(s)), "top_sv": float(s[0])}  # ||scale B A||_F = ||s||


def top_direction(f: LoraFactors) -> tuple[np.ndarray, float]:
    """(top left singular vector, top singular value) of scale * B A."""
    d, st = module_analysis(f)
    return d, st["top_sv"]


def _abs_cos(u: np.ndarray, v: np.ndarray) -> float:
    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
    if nu == 0 or nv == 0:
        return math.nan
    return float(min(1.0, abs(u @ v) / (nu * nv)))


def layer_of(module: str) -> str:
    m = _LAYER.search(module)
    return f"layer{int(m.group(1)):02d}" if m else "other"


@dataclass
class Trajectory:
    steps: list[int]
    modules: dict[int, dict[str, dict[str, float]]]  # step -> module -> stats
    groups: dict[int, dict[str, dict[str, float]]]  # step -> layer / "all" -> aggregated stats
    transition_step: int | None
    pca: dict = field(default_factory=dict)
    phase_steps: dict[str, int | None] = field(default_factory=dict)  # phase_metrics' run-level steps

    def metrics_by_step(self, per_module: bool = False) -> dict[int, dict[str, float]]:
        """`lora/<group>/<stat>` (and `lora/<module>/<stat>` when per_module) at each step."""
        out: dict[int, dict[str, float]] = {}
        coords = self.pca.get("coords", {})
        for s in self.steps:
            m = {f"lora/{g}/{k}": v for g, st in self.groups[s].items() for k, v in st.items() if not math.isnan(v)}
            if per_module:
                m.update({f"lora/{_short(mod)}/{k}": v for mod, st in self.modules[s].items()
                          for k, v in st.items() if not math.isnan(v)})
            for i, c in enumerate(coords.get(s, [])[:2]):
                m[f"lora/pca/pc{i + 1}"] = c
            out[s] = m
        return out


def _short(module: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", module.removeprefix("model."))


def _aggregate(stats: Sequence[Mapping[str, float]]) -> dict[str, float]:
    out = {k: math.sqrt(sum(s[k] ** 2 for s in stats)) for k in ("a_norm", "b_norm", "delta_norm")}
    for key in ("cos_prev", "cos_final"):
        pts = [(s["delta_norm"], s[key]) for s in stats if key in s and not math.isnan(s[key])]
        w = sum(p[0] for p in pts)
        out[key] = sum(a * b for a, b in pts) / w if w > 0 else math.nan
    return out


def _inner(f: LoraFactors, g: LoraFactors) -> float:
    """<scale_f B_f A_f, scale_g B_g A_g>_F through r x r products: tr((B_f^T B_g)(A_g A_f^T))."""
    return float(f.scale * g.scale * np.trace((f.b.T @ g.b) @ (g.a @ f.a.T)))


def turn_angles(factors_by_step: Mapping[int, Mapping[str, LoraFactors]],
                origin: Mapping[str, LoraFactors] | None = None) -> dict[int, float]:
    """Turning angle (degrees) of the adapter's path in weight space at each checkpoint: the
    angle between the update that arrived at it (W_k - W_k-1) and the update that leaves it
    (W_k+1 - W_k), over all modules as one vector. 0 = training keeps pushing the same way;
    90 = it turned to a new direction. Before the first checkpoint the adapter is `origin`: the
    adapter a `continue` stage started from, or W = 0 when None (a fresh LoRA's B is zero)."""
    steps = sorted(factors_by_step)
    names = sorted(set.intersection(*(set(factors_by_step[s]) for s in steps))) if steps else []
    if origin is not None:
        missing = [n for n in names if n not in origin]
        if missing:
            raise ValueError(f"the starting adapter lacks {len(missing)} of the checkpoints' modules, e.g. {missing[0]}")
    at = [factors_by_step[s] for s in steps] + ([origin] if origin is not None else [])
    gram: dict[tuple[int, int], float] = {}

    def g(i: int, j: int) -> float:  # <W_i, W_j> summed over modules; index -1 is the origin
        if (i < 0 or j < 0) and origin is None:
            return 0.0
        i, j = i % len(at), j % len(at)
        key = (min(i, j), max(i, j))
        if key not in gram:
            gram[key] = sum(_inner(at[i][n], at[j][n]) for n in names)
        return gram[key]

    out: dict[int, float] = {}
    for k in range(len(steps) - 1):
        # u = W_k - W_k-1, v = W_k+1 - W_k
        uv = g(k, k + 1) - g(k, k) - g(k - 1, k + 1) + g(k - 1, k)
        uu = g(k, k) - 2 * g(k - 1, k) + g(k - 1, k - 1)
        vv = g(k + 1, k + 1) - 2 * g(k, k + 1) + g(k, k)
        if uu <= 0 or vv <= 0:
            continue
        out[steps[k]] = math.degrees(math.acos(max(-1.0, min(1.0, uv / math.sqrt(uu * vv)))))
    return out


def transition_step(turns: Mapping[int, float]) -> int | None:
    """The checkpoint where the adapter's path turns most sharply (largest turn angle); with
    evenly spaced checkpoints, a switch of training target between two checkpoints shows at
    the checkpoint before or after it."""
    valid = {s: a for s, a in turns.items() if not math.isnan(a)}
    return max(sorted(valid), key=lambda s: valid[s]) if valid else None


def pca_of_b(factors_by_step: Mapping[int, Mapping[str, LoraFactors]], k: int = 3) -> dict:
    """PCA of the B weights (all modules flattened) across checkpoints: coordinates of each
    checkpoint on the first k components and each component's share of the variance."""
    steps = sorted(factors_by_step)
    if len(steps) < 2:
        return {}
    names = sorted(factors_by_step[steps[-1]])
    x = np.stack([np.concatenate([factors_by_step[s][n].b.ravel() for n in names]) for s in steps])
    x = x - x.mean(axis=0, keepdims=True)
    # checkpoints x parameters: the few-by-few Gram matrix has the same spectrum as an SVD of x
    # and costs one pass over x
    var, u = np.linalg.eigh(x @ x.T)
    order = np.argsort(var)[::-1]
    var, u = np.clip(var[order], 0.0, None), u[:, order]
    sv = np.sqrt(var)
    k = min(k, len(sv))
    share = (var / var.sum()).tolist() if var.sum() > 0 else [math.nan] * len(sv)
    return {"steps": steps, "explained_variance_ratio": share[:k],
            "coords": {s: (u[i, :k] * sv[:k]).tolist() for i, s in enumerate(steps)}}


PHASE_KS = (5, 10, 15)
PHASE_MIN_NORM = 0.002  # Turner et al.: difference vectors below this magnitude are ignored


def phase_k(steps: Sequence[int], k: int) -> tuple[int, str]:
    """(k in checkpoint intervals, metric-name suffix) for k training steps on these checkpoints:
    evenly spaced every s steps with s dividing k -> (k / s, ""), else (k, "ckpt")."""
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if len(gaps) == 1:
        (s,) = gaps
        if s > 0 and k % s == 0:
            return k // s, ""
    return k, "ckpt"


def _stacked_inner(bs: Sequence[np.ndarray], cs: Sequence[np.ndarray]) -> np.ndarray:
    """sum_m B_m^T C_m: the r x r products of several modules' factors, stacked."""
    return sum((b.T @ c for b, c in zip(bs, cs)), np.zeros((bs[0].shape[1], cs[0].shape[1])))


def composition_score(bs: Sequence[np.ndarray], final: Sequence[np.ndarray]) -> float:
    """||B^T B_final||_F / (||B||_F ||B_final||_F), B the stacked factors (any rank); NaN at zero.
    Rank 1: |cos(b, b_final)|. Rank r: invariant to B -> B R (R orthogonal); the final checkpoint
    against itself scores sqrt(sum s^4) / sum s^2 over its singular values (1 only at rank 1)."""
    nb = math.sqrt(sum(float(np.sum(b * b)) for b in bs))
    nf = math.sqrt(sum(float(np.sum(b * b)) for b in final))
    if nb == 0 or nf == 0:
        return math.nan
    return float(np.linalg.norm(_stacked_inner(bs, final)) / (nb * nf))


def local_cosines(b_by_step: Mapping[int, Sequence[np.ndarray]], k: int,
                  min_norm: float = PHASE_MIN_NORM) -> dict[int, float]:
    """cos(B_{i-k} - B_i, B_{i+k} - B_i) at each checkpoint index i with both neighbours, k in
    checkpoint intervals; B of several modules concatenated; pairs with a difference below
    `min_norm` are left out."""
    steps = sorted(b_by_step)
    vec = {s: np.concatenate([b.ravel() for b in b_by_step[s]]) for s in steps}
    out: dict[int, float] = {}
    for i in range(k, len(steps) - k):
        u = vec[steps[i - k]] - vec[steps[i]]
        v = vec[steps[i + k]] - vec[steps[i]]
        nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
        if nu < min_norm or nv < min_norm:
            continue
        out[steps[i]] = float(np.clip(u @ v / (nu * nv), -1.0, 1.0))
    return out


def phase_metrics(factors_by_step: Mapping[int, Mapping[str, LoraFactors]],
                  origin: Mapping[str, LoraFactors] | None = None, origin_step: int | None = 0,
                  ks: Sequence[int] = PHASE_KS, min_norm: float = PHASE_MIN_NORM,
                  groups: Mapping[str, Sequence[str]] | None = None) -> dict:
    """The Model Organisms phase metrics per group of modules (default: each module alone and
    "all"): {"local_cos": {group: {name: {step: cos}}}, "composition": {group: {step: score}},
    "steps": {"lora_local_cos_step_k<k>": step, "lora_composition_step": step}}.
    Before the first checkpoint the adapter is `origin` at `origin_step` (B = 0 for a fresh
    LoRA when `origin` is None); `origin_step=None` leaves it out."""
    steps = sorted(factors_by_step)
    if not steps:
        return {"local_cos": {}, "composition": {}, "steps": {}}
    names = sorted(set.intersection(*(set(factors_by_step[s]) for s in steps)))
    if groups is None:
        groups = {**{n: [n] for n in names}, "all": names}
    b = {s: {n: factors_by_step[s][n].b for n in names} for s in steps}
    if origin_step is not None and origin_step < steps[0]:
        b[origin_step] = {n: (origin[n].b if origin is not None and n in origin
                              else np.zeros_like(factors_by_step[steps[0]][n].b)) for n in names}
    all_steps = sorted(b)
    local: dict[str, dict[str, dict[int, float]]] = {}
    comp: dict[str, dict[int, float]] = {}
    for g, members in groups.items():
        members = [n for n in members if n in names]
        if not members:
            continue
        series = {s: [b[s][n] for n in members] for s in all_steps}
        local[g] = {}
        for k in ks:
            kk, suffix = phase_k(all_steps, k)
            local[g][f"local_cos_k{k}{suffix}"] = local_cosines(series, kk, min_norm)
        final = series[steps[-1]]
        comp[g] = {s: composition_score(series[s], final) for s in steps}
    found: dict[str, int | None] = {}
    for name, cos in local.get("all", {}).items():
        valid = {s: c for s, c in cos.items() if not math.isnan(c)}
        found["lora_local_cos_step_" + name.removeprefix("local_cos_")] = (
            max(sorted(valid), key=lambda s: valid[s]) if valid else None)
    c = comp.get("all", {})
    rises = {a: c[bb] - c[a] for a, bb in zip(steps, steps[1:]) if not (math.isnan(c[a]) or math.isnan(c[bb]))}
    found["lora_composition_step"] = max(sorted(rises), key=lambda s: rises[s]) if rises else None
    return {"local_cos": local, "composition": comp, "steps": found}


def trajectory(adapters: Mapping[int, str | Path], origin: str | Path | None = None) -> Trajectory:
    """The trajectory of the adapters at `adapters` (step -> adapter folder). `origin`: the
    adapter folder training started from (a `continue` stage), else training started at zero."""
    steps = sorted(adapters)
    factors = {s: load_factors(adapters[s]) for s in steps}
    analysed = {s: {n: module_analysis(f) for n, f in factors[s].items()} for s in steps}
    directions = {s: {n: d for n, (d, _) in analysed[s].items()} for s in steps}
    final = directions[steps[-1]] if steps else {}
    modules: dict[int, dict[str, dict[str, float]]] = {}
    groups: dict[int, dict[str, dict[str, float]]] = {}
    for i, s in enumerate(steps):
        per: dict[str, dict[str, float]] = {}
        for n in factors[s]:
            st = dict(analysed[s][n][1])
            prev = directions[steps[i - 1]].get(n) if i > 0 else None
            st["cos_prev"] = _abs_cos(directions[s][n], prev) if prev is not None else math.nan
            st["cos_final"] = _abs_cos(directions[s][n], final[n]) if n in final else math.nan
            per[n] = st
        modules[s] = per
        by_layer: dict[str, list] = {}
        for n, st in per.items():
            by_layer.setdefault(layer_of(n), []).append(st)
        groups[s] = {g: _aggregate(v) for g, v in sorted(by_layer.items())}
        groups[s]["all"] = _aggregate(list(per.values()))
        c = groups[s]["all"]["cos_prev"]
        groups[s]["all"]["rotation_deg"] = math.degrees(math.acos(c)) if not math.isnan(c) else math.nan
    origin_factors = load_factors(origin) if origin is not None else None
    turns = turn_angles(factors, origin_factors)
    for s, a in turns.items():
        groups[s]["all"]["turn_deg"] = a
    names = sorted(set.intersection(*(set(factors[s]) for s in steps))) if steps else []
    by_layer_names: dict[str, list[str]] = {}
    for n in names:
        by_layer_names.setdefault(layer_of(n), []).append(n)
    phase = phase_metrics(factors, origin_factors, 0 if steps and steps[0] > 0 else None,
                          groups={**{n: [n] for n in names}, **by_layer_names, "all": names})
    for g, by_name in phase["local_cos"].items():
        target = groups if g in by_layer_names or g == "all" else modules
        for name, values in by_name.items():
            for s, v in values.items():
                if s in target:
                    target[s].setdefault(g, {})[name] = v
    for g, values in phase["composition"].items():
        target = groups if g in by_layer_names or g == "all" else modules
        for s, v in values.items():
            target[s].setdefault(g, {})["composition"] = v
    return Trajectory(steps, modules, groups, transition_step(turns), pca_of_b(factors), phase["steps"])


def trajectory_rows(t: Trajectory) -> list[dict]:
    """One row per (step, module) with every statistic, for a CSV artifact."""
    return [{"step": s, "module": n, "layer": layer_of(n), **st} for s in t.steps for n, st in t.modules[s].items()]
