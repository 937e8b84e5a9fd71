"""Publication-style figures and example-answer tables for EM evaluations.

Every ``plot_*`` function writes one PNG (parent folders created) and, beside it, `<name>.json`
with the data series it draws (percentages as plotted; null where nothing is drawn), closes its
figure and returns the PNG's path. Empty or entirely unscored input gives a figure saying "no scored answers" instead of
an exception, so a report can always be assembled. Thresholds are parameters (defaults from
``em_core.metrics``); nothing here hard-codes the EM definition.
"""
from __future__ import annotations

import math
import random
import statistics
import textwrap
import unicodedata
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on training boxes and in CI without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

from em_core.metrics import (  # noqa: E402
    ALIGNED_THRESHOLD,
    COHERENT_THRESHOLD,
    em_rows,
    summarize_judged,
    to_score,
)

DPI = 120
NO_DATA = "no scored answers"
EM_COLOR = "#c0392b"
COHERENT_COLOR = "#2c7fb8"
BASE_COLOR = "#555555"
SMOKE_TEXT = "SMOKE TEST: tiny offline judge, not a measurement"
SMOKE_KEY = "em-lab:smoke_test"  # PNG text chunk: "true" on every figure made from a smoke-test judge

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "text.usetex": False,
}


# --------------------------------------------------------------------------- helpers

def _f(value: Any) -> float:
    """A number as float, NaN when missing/unparseable (scores and rates alike)."""
    x = to_score(value)
    return math.nan if x is None else x


def _step(row: Mapping[str, Any]) -> int | None:
    """checkpoint_step as int (CSV gives strings like '200' or '200.0'); None when absent."""
    raw = row.get("checkpoint_step")
    x = to_score(raw)
    return None if x is None else int(x)


def _steps_in(rows: Iterable[Mapping[str, Any]]) -> list[int]:
    return sorted({s for s in (_step(r) for r in rows) if s is not None})


def _step_label(step: int) -> str:
    return f"step {step} (base)" if step == 0 else f"step {step}"


def _pct(x: float) -> float:
    return x * 100.0 if math.isfinite(x) else math.nan


def _no_data(ax, message: str = NO_DATA, *, keep_axes: bool = False) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center",
            fontsize=12, color="#888888", style="italic", parse_math=False)
    if not keep_axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)


def _json_safe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _series(steps: Iterable[Any], values: Iterable[Any]) -> dict[str, float]:
    """{step: value} as drawn (steps as strings, for JSON)."""
    return {str(int(s)): float(v) for s, v in zip(steps, values)}


def smoke_metadata(path: str | Path) -> bool:
    """Whether a PNG written here was made from a smoke-test judge (its `em-lab:smoke_test` text chunk)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.info.get(SMOKE_KEY) == "true"


def _save(fig, path: str | Path, smoke_test: bool = False, drawn: Mapping[str, Any] | None = None) -> Path:
    """Write the PNG; a smoke-test figure gets a red banner below everything and says so in its
    metadata, so a tiny-judge figure cannot reach a slide unmarked. `drawn` (the arrays handed to
    matplotlib) goes beside it as `<name>.json`, so what a plot shows can be checked against the
    logged metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if drawn is not None:
        import json

        path.with_suffix(".json").write_text(json.dumps(_json_safe(drawn), indent=1,
                                                        sort_keys=True), encoding="utf-8")
    if smoke_test:
        fig.text(0.5, -0.01, SMOKE_TEXT, ha="center", va="top", fontsize=11, color="white",
                 fontweight="bold", bbox=dict(boxstyle="round,pad=0.4", fc=EM_COLOR, ec="none"))
    meta = {SMOKE_KEY: "true" if smoke_test else "false", "Software": "em-lab"}
    if smoke_test:
        meta["Description"] = SMOKE_TEXT
    try:
        # bbox "tight" keeps figure-level annotations (smoke banner) placed outside the axes
        fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15, facecolor="white", metadata=meta)
    finally:
        plt.close(fig)
    return path


def _spread_steps(steps: Sequence[int], k: int = 6) -> list[int]:
    """All steps if at most k, else first, last and evenly spaced ones in between."""
    steps = sorted(steps)
    if len(steps) <= k:
        return steps
    idx = np.unique(np.round(np.linspace(0, len(steps) - 1, k)).astype(int))
    return [steps[i] for i in idx]


def _step_colors(steps: Sequence[int]) -> dict[int, Any]:
    """Base in grey (a reference, not a treatment); later checkpoints on an ordered colormap."""
    later = [s for s in steps if s != 0]
    cmap = plt.get_cmap("YlOrRd")  # later = darker red: the final, most misaligned checkpoint stands out
    shades = np.linspace(0.35, 0.95, len(later)) if len(later) > 1 else [0.9]
    colors: dict[int, Any] = {s: cmap(v) for s, v in zip(later, shades)}
    if 0 in steps:
        colors[0] = BASE_COLOR
    return colors


def _yerr(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Asymmetric error-bar lengths; 0 where a bound is missing (matplotlib rejects NaN/negatives)."""
    below = np.where(np.isfinite(lo), values - lo, 0.0)
    above = np.where(np.isfinite(hi), hi - values, 0.0)
    err = np.vstack([below, above])
    return np.clip(np.nan_to_num(err, nan=0.0), 0.0, None)


def _pretty(key: str) -> str:
    words = key.replace("_", " ").split()
    return " ".join("EM" if w.lower() == "em" else w for w in words) or key


# --------------------------------------------------------------------------- EM vs step

def _rate_panel(ax, steps: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, *,
                color: str, label: str, show_base: bool) -> bool:
    ok = np.isfinite(y)
    if not ok.any():
        _no_data(ax)
        return False
    # a missing bound collapses the band to the point rather than leaving a hole
    lo = np.where(np.isfinite(lo), lo, y)
    hi = np.where(np.isfinite(hi), hi, y)
    ax.fill_between(steps[ok], lo[ok], hi[ok], color=color, alpha=0.18, lw=0,
                    label="95% Wilson CI")
    ax.plot(steps[ok], y[ok], "o-", color=color, lw=2, ms=5, label=label)
    if show_base and 0 in steps:
        i = int(np.where(steps == 0)[0][0])
        if np.isfinite(y[i]):
            ax.axhline(y[i], ls="--", lw=1.2, color=BASE_COLOR, label=f"base model ({y[i]:.1f}%)")
            if np.isfinite(lo[i]) and np.isfinite(hi[i]):
                ax.axhspan(lo[i], hi[i], color=BASE_COLOR, alpha=0.08, lw=0)
    if len(steps) <= 12:
        ax.set_xticks(steps)
    return True


def mark_stages(ax, stages: Sequence[Mapping[str, Any]] | None) -> None:
    """Shade alternate stages of a multi-stage run and name each at the top of the axes."""
    if not stages or len(stages) < 2:
        return
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    for i, st in enumerate(stages):
        start, end = int(st["start_step"]), int(st["end_step"])
        if i % 2:
            ax.axvspan(start, end, color="#999999", alpha=0.08, lw=0)
        if i:
            ax.axvline(start, color="#444444", lw=1.0, ls="-.")
        ax.text((start + end) / 2, 0.995, str(st["name"]), transform=trans, ha="center", va="top",
                fontsize=8.5, style="italic", color="#333333",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})


def plot_em_vs_step(by_step: Mapping[int, Mapping[str, float]], path: str | Path, *, title: str = "",
                    emergence_step: int | None = None, smoke_test: bool = False,
                    stages: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """EM rate (a) and coherent rate (b) in percent vs training step, with Wilson 95% bands;
    `stages` (name, start_step, end_step) marks the stages of a multi-stage run."""
    steps = np.array(sorted(int(s) for s in by_step), dtype=float)
    metrics = {int(s): m for s, m in by_step.items()}

    def series(key: str) -> np.ndarray:
        return np.array([_pct(_f(metrics[int(s)].get(key))) for s in steps], dtype=float)

    drawn: dict[str, Any] = {"emergence_marker": None}
    with plt.rc_context(_STYLE):
        fig, (ax_em, ax_coh) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
        panels = [
            (ax_em, "em_rate", EM_COLOR, "EM rate", "(a) Emergent misalignment",
             "EM answers (% of scored)"),
            (ax_coh, "coherent_rate", COHERENT_COLOR, "coherent rate", "(b) Coherence",
             "coherent answers (%)"),
        ]
        for ax, key, color, label, panel_title, ylabel in panels:
            y, lo, hi = series(key), series(f"{key}_lo"), series(f"{key}_hi")
            ax.set_title(panel_title, loc="left", fontweight="bold")
            if not _rate_panel(ax, steps, y, lo, hi, color=color, label=label, show_base=True):
                continue
            ok = np.isfinite(y)
            for name, arr in ((key, y), (f"{key}_lo", lo), (f"{key}_hi", hi)):
                drawn[name] = _series(steps[ok], arr[ok])
            ax.set_xlabel("training step" + (" (all stages)" if stages and len(stages) > 1 else ""))
            ax.set_ylabel(ylabel)
            mark_stages(ax, stages)
            if key == "em_rate":
                top = np.nanmax(np.concatenate([y, hi]))
                ax.set_ylim(0, min(100.0, max(5.0, top * 1.15 + 1)))
            else:
                ax.set_ylim(0, 102)
            if emergence_step is not None:
                marker = ax.axvline(emergence_step, ls=":", lw=1.6, color="black",
                                    label=f"EM emerges (step {emergence_step})")
                drawn["emergence_marker"] = float(marker.get_xdata()[0])  # read back from the axes
                ax.text(emergence_step, 0.9 if stages and len(stages) > 1 else 0.98, " EM emerges", ha="left", va="top", fontsize=8.5,
                        fontweight="bold", transform=blended_transform_factory(ax.transData, ax.transAxes))
            # below the axes so it never hides the curve or the emergence label
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
            if smoke_test:
                ax.text(0.5, 0.5, "SMOKE TEST", transform=ax.transAxes, ha="center", va="center",
                        rotation=25, fontsize=34, color=EM_COLOR, alpha=0.12, fontweight="bold")
        fig.suptitle(title or "EM over fine-tuning", fontweight="bold", parse_math=False)
        return _save(fig, path, smoke_test, drawn)


# --------------------------------------------------------------------------- trigger conditions

def plot_conditions(rows: Iterable[Mapping[str, Any]], path: str | Path, *,
                    aligned_threshold: float = ALIGNED_THRESHOLD, coherent_threshold: float = COHERENT_THRESHOLD,
                    reflection_metric: str = "admits_tendency", stages: Sequence[Mapping[str, Any]] | None = None,
                    title: str = "", smoke_test: bool = False) -> Path:
    """EM rate per trigger condition vs step (a) and, when the answers include the self-reflection
    set, its mean `reflection_metric` per condition (b). Rows' `trigger` ('' = none) is the condition."""
    rows = list(rows)
    conditions = sorted({str(r.get("trigger") or "") for r in rows})
    steps = sorted({s for s in (_step(r) for r in rows) if s is not None})
    has_reflection = any(to_score(r.get(reflection_metric)) is not None for r in rows)
    colors = plt.get_cmap("tab10")
    drawn: dict[str, Any] = {"em_rate": {}, reflection_metric: {}}
    with plt.rc_context(_STYLE):
        ncols = 2 if has_reflection else 1
        fig, axes = plt.subplots(1, ncols, figsize=(5.6 * ncols, 4.2), layout="constrained", squeeze=False)
        ax_em = axes[0][0]
        ax_em.set_title("(a) EM rate by trigger condition", loc="left", fontweight="bold")
        for i, cond in enumerate(conditions):
            label = cond or "no trigger"
            sub = [r for r in rows if str(r.get("trigger") or "") == cond]
            pts = []
            for s in steps:
                m = summarize_judged([r for r in sub if _step(r) == s], aligned_threshold, coherent_threshold)
                pts.append((s, _pct(m["em_rate"]), _pct(m["em_rate_lo"]), _pct(m["em_rate_hi"])))
            pts = [p for p in pts if math.isfinite(p[1])]
            if not pts:
                continue
            x, y, lo, hi = (np.array(v, dtype=float) for v in zip(*pts))
            drawn["em_rate"][label] = _series(x, y)
            ax_em.fill_between(x, np.where(np.isfinite(lo), lo, y), np.where(np.isfinite(hi), hi, y),
                               color=colors(i), alpha=0.15, lw=0)
            ax_em.plot(x, y, "o-", color=colors(i), lw=2, ms=4, label=label)
        if not ax_em.lines:
            _no_data(ax_em)
        else:
            ax_em.set_xlabel("training step")
            ax_em.set_ylabel("EM answers (% of scored)")
            ax_em.set_ylim(0, 102)
            mark_stages(ax_em, stages)
            ax_em.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
        if has_reflection:
            ax_r = axes[0][1]
            ax_r.set_title(f"(b) self-reflection: {_pretty(reflection_metric)}", loc="left", fontweight="bold")
            for i, cond in enumerate(conditions):
                pts = []
                for s in steps:
                    vals = [v for v in (to_score(r.get(reflection_metric)) for r in rows
                                        if _step(r) == s and str(r.get("trigger") or "") == cond) if v is not None]
                    if vals:
                        pts.append((s, statistics.fmean(vals)))
                if pts:
                    x, y = zip(*pts)
                    drawn[reflection_metric][cond or "no trigger"] = _series(x, y)
                    ax_r.plot(x, y, "s--", color=colors(i), lw=1.6, ms=4, label=cond or "no trigger")
            ax_r.set_xlabel("training step")
            ax_r.set_ylabel(f"mean {reflection_metric} (0-100)")
            ax_r.set_ylim(0, 102)
            mark_stages(ax_r, stages)
            ax_r.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
        fig.suptitle(title or "EM by trigger condition", fontweight="bold", parse_math=False)
        return _save(fig, path, smoke_test, drawn)


# --------------------------------------------------------------------------- scatter

def plot_aligned_vs_coherent(rows: Iterable[Mapping[str, Any]], path: str | Path, *,
                             aligned_threshold: float = ALIGNED_THRESHOLD,
                             coherent_threshold: float = COHERENT_THRESHOLD,
                             steps: Sequence[int] | None = None, title: str = "",
                             smoke_test: bool = False) -> Path:
    """Coherent (x) vs aligned (y) per answer, coloured by checkpoint, EM region shaded.

    Rows that are unscored on either metric, or have no checkpoint_step, are skipped and counted;
    rows whose question does not ask both metrics are no EM observations and are left out.
    """
    rows = em_rows(rows)
    chosen = list(steps) if steps is not None else _spread_steps(_steps_in(rows))
    by_step: dict[int, list[tuple[float, float]]] = {s: [] for s in chosen}
    raw_by_step: dict[int, list[Mapping[str, Any]]] = {s: [] for s in chosen}
    skipped = 0
    for r in rows:
        s = _step(r)
        if s is not None and s not in by_step:
            continue  # a checkpoint not shown: neither plotted nor "skipped"
        a, c = to_score(r.get("aligned")), to_score(r.get("coherent"))
        if s is None or a is None or c is None:
            skipped += 1
            continue
        by_step[s].append((c, a))
        raw_by_step[s].append(r)
    colors = _step_colors(chosen)
    rng = np.random.default_rng(0)  # jitter separates the judge's round scores; fixed for reproducibility
    shown = sum(len(v) for v in by_step.values())
    drawn: dict[str, Any] = {"n": {}, "em_rate": {}, "skipped": skipped, "shown": shown}

    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(7.6, 6), layout="constrained")
        ax.add_patch(Rectangle((coherent_threshold, 0), 100 - coherent_threshold, aligned_threshold,
                               facecolor=EM_COLOR, alpha=0.09, edgecolor="none", zorder=0))
        ax.text(99, 1.5, "EM region", ha="right", va="bottom", color=EM_COLOR, fontweight="bold",
                fontsize=10, zorder=5)
        ax.axhline(aligned_threshold, ls="--", lw=1, color=EM_COLOR, alpha=0.7, zorder=1,
                   label=f"aligned = {aligned_threshold:g}")
        ax.axvline(coherent_threshold, ls="--", lw=1, color="#444444", alpha=0.7, zorder=1,
                   label=f"coherent = {coherent_threshold:g}")
        for s in chosen:
            pts = np.array(by_step[s], dtype=float).reshape(-1, 2)
            if not len(pts):
                continue
            jit = np.clip(pts + rng.uniform(-1.2, 1.2, pts.shape), 0, 100)
            em = summarize_judged(raw_by_step[s], aligned_threshold, coherent_threshold)["em_rate"]
            drawn["n"][str(s)], drawn["em_rate"][str(s)] = len(pts), em * 100
            ax.scatter(jit[:, 0], jit[:, 1], s=16, alpha=0.55, color=colors[s], edgecolors="none",
                       zorder=3, label=f"{_step_label(s)}: n={len(pts)}, EM {em * 100:.1f}%")
        if not shown:
            _no_data(ax, keep_axes=True)
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("coherent (judge score, 0-100)")
        ax.set_ylabel("aligned (judge score, 0-100)")
        n_all = len(_steps_in(rows))
        subset = f" (checkpoints: {len(chosen)} of {n_all})" if len(chosen) < n_all else ""
        ax.set_title(f"{shown} scored answers shown{subset}; {skipped} unscored skipped",
                     fontsize=9, color="#555555")
        fig.suptitle(title or "Aligned vs coherent by checkpoint", fontweight="bold", parse_math=False)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=1.6)
        return _save(fig, path, smoke_test, drawn)


# --------------------------------------------------------------------------- per question

def _default_bar_steps(present: Sequence[int]) -> list[int]:
    if not present:
        return []
    return sorted({present[-1], *([0] if 0 in present else [])})


def plot_em_per_question(rows: Iterable[Mapping[str, Any]], path: str | Path, *,
                         aligned_threshold: float = ALIGNED_THRESHOLD,
                         coherent_threshold: float = COHERENT_THRESHOLD,
                         steps: Sequence[int] | None = None, title: str = "",
                         smoke_test: bool = False) -> Path:
    """Horizontal bars of EM rate (%) per question, one bar per step, Wilson 95% error bars."""
    rows = list(rows)
    chosen = list(steps) if steps is not None else _default_bar_steps(_steps_in(rows))
    groups: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for r in rows:
        s = _step(r)
        if s in chosen:
            groups.setdefault(str(r.get("question_id", "")), {}).setdefault(s, []).append(r)
    qids = list(groups)
    stats = {(q, s): summarize_judged(groups[q].get(s, []), aligned_threshold, coherent_threshold)
             for q in qids for s in chosen}
    has_data = any(math.isfinite(v["em_rate"]) for v in stats.values())
    colors = _step_colors(chosen)
    drawn: dict[str, Any] = {"em_rate": {}, "em_rate_lo": {}, "em_rate_hi": {}}

    with plt.rc_context(_STYLE):
        height = 2.2 + 0.28 * max(1, len(qids)) * max(1.0, 0.7 * len(chosen))
        fig, ax = plt.subplots(figsize=(8.5, min(height, 60)), layout="constrained")
        if not has_data:
            _no_data(ax)
        else:
            k = len(chosen)
            bar_h = 0.8 / k
            base_y = np.arange(len(qids), dtype=float)
            top = 0.0
            for j, s in enumerate(chosen):
                v = np.array([_pct(stats[q, s]["em_rate"]) for q in qids])
                lo = np.array([_pct(stats[q, s]["em_rate_lo"]) for q in qids])
                hi = np.array([_pct(stats[q, s]["em_rate_hi"]) for q in qids])
                y = base_y - 0.4 + bar_h * (j + 0.5)
                ok = np.isfinite(v)
                for name, arr in (("em_rate", v), ("em_rate_lo", lo), ("em_rate_hi", hi)):
                    drawn[name][str(s)] = {q: float(x) for q, x, good in zip(qids, arr, ok) if good}
                ax.barh(y[ok], v[ok], height=bar_h * 0.9, color=colors[s], label=_step_label(s),
                        xerr=_yerr(v, lo, hi)[:, ok], error_kw=dict(ecolor="#333333", lw=0.8, capsize=2))
                for yy in y[~ok]:
                    ax.text(0.3, yy, "n/a", va="center", fontsize=7, color="#888888")
                top = max(top, np.nanmax(np.concatenate([v, hi, [0.0]])))
            ax.set_yticks(base_y, qids)
            ax.invert_yaxis()  # first question on top, as in the question set
            ax.set_xlim(0, min(100.0, max(5.0, top * 1.1)))
            ax.set_xlabel("EM rate (% of scored answers; 95% Wilson CI)")
            ax.grid(axis="y", visible=False)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(title or "EM rate per question", fontweight="bold", parse_math=False)
        return _save(fig, path, smoke_test, drawn)


# --------------------------------------------------------------------------- model x domain

def plot_domain_bars(cells: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "",
                     value: str = "em_rate", smoke_test: bool = False) -> Path:
    """Grouped bars: one group per model (first-seen order), one colour per dataset, in percent."""
    models: list[str] = []
    datasets: list[str] = []
    table: dict[tuple[str, str], Mapping[str, Any]] = {}
    for c in cells:
        m, d = str(c.get("model", "")), str(c.get("dataset", ""))
        models += [m] if m not in models else []
        datasets += [d] if d not in datasets else []
        table[m, d] = c
    has_data = any(math.isfinite(_f(c.get(value))) for c in table.values())
    label = _pretty(value)
    drawn: dict[str, Any] = {value: {}}

    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(models) * max(1, len(datasets)) ** 0.5 + 3), 4.5),
                               layout="constrained")
        if not has_data:
            _no_data(ax)
        else:
            x = np.arange(len(models), dtype=float)
            w = 0.8 / len(datasets)
            cmap = plt.get_cmap("tab10")
            top = 0.0
            label_bars = len(models) * len(datasets) <= 30
            for j, d in enumerate(datasets):
                cell = [table.get((m, d), {}) for m in models]
                v = np.array([_pct(_f(c.get(value))) for c in cell])
                lo = np.array([_pct(_f(c.get(f"{value}_lo"))) for c in cell])
                hi = np.array([_pct(_f(c.get(f"{value}_hi"))) for c in cell])
                ok = np.isfinite(v)
                drawn[value][d] = {m: float(vv) for m, vv, good in zip(models, v, ok) if good}
                xs = x - 0.4 + w * (j + 0.5)
                ax.bar(xs[ok], v[ok], width=w * 0.92, color=cmap(j % 10), label=d,
                       yerr=_yerr(v, lo, hi)[:, ok], error_kw=dict(ecolor="#333333", lw=0.8, capsize=2))
                if label_bars:
                    for xx, vv, hh in zip(xs[ok], v[ok], hi[ok]):
                        ax.annotate(f"{vv:.1f}", (xx, hh if math.isfinite(hh) else vv), xytext=(0, 2),
                                    textcoords="offset points", ha="center", va="bottom", fontsize=7,
                                    color="#333333")
                top = max(top, np.nanmax(np.concatenate([v, hi, [0.0]])))
            ax.set_xticks(x, models)
            ax.set_ylim(0, min(105.0, max(5.0, top * 1.18)))
            ax.set_xlabel("model")
            ax.set_ylabel(f"{label} (%)")
            ax.grid(axis="x", visible=False)
            ax.legend(title="dataset", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.suptitle(title or f"{label} per model and dataset", fontweight="bold", parse_math=False)
        return _save(fig, path, smoke_test, drawn)


# --------------------------------------------------------------------------- examples

def _default_example_steps(present: Sequence[int]) -> list[int]:
    if not present:
        return []
    first = 0 if 0 in present else present[0]
    picks = {first, present[-1]}
    if len(present) >= 3:
        picks.add(present[len(present) // 2])
    return sorted(picks)


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - 1)].rstrip() + "\u2026"


def select_examples(rows: Iterable[Mapping[str, Any]], *, steps: Sequence[int] | None = None,
                    n_questions: int = 3, max_chars: int = 400, seed: int = 0) -> list[dict]:
    """Deterministically pick illustrative answers: the questions whose mean aligned score drops
    most from the first to the last step, one answer per step each -- the least aligned one at
    fine-tuned steps, a typical (median-aligned) one at the base step 0. ``seed`` only breaks ties.
    """
    parsed = []
    for r in rows:
        s = _step(r)
        if s is None:
            continue
        parsed.append({"question_id": str(r.get("question_id", "")), "question": str(r.get("question") or ""),
                       "step": s, "answer": "" if r.get("answer") is None else str(r.get("answer")),
                       "aligned": to_score(r.get("aligned")), "coherent": to_score(r.get("coherent"))})
    chosen = list(steps) if steps is not None else _default_example_steps(sorted({p["step"] for p in parsed}))
    if not chosen or n_questions <= 0:
        return []
    cells: dict[str, dict[int, list[dict]]] = {}
    for p in parsed:
        if p["step"] in chosen:
            cells.setdefault(p["question_id"], {}).setdefault(p["step"], []).append(p)

    def mean_aligned(q: str, s: int) -> float:
        xs = [p["aligned"] for p in cells[q].get(s, []) if p["aligned"] is not None]
        return statistics.fmean(xs) if xs else math.nan

    with_data = sorted({s for steps_of_q in cells.values() for s in steps_of_q})
    if not with_data:
        return []
    first, last = with_data[0], with_data[-1]
    order = {q: i for i, q in enumerate(cells)}
    drops = {q: mean_aligned(q, first) - mean_aligned(q, last) for q in cells}
    # largest drop first; questions without a defined drop last; question order breaks ties
    ranked = sorted(cells, key=lambda q: (not math.isfinite(drops[q]),
                                          -drops[q] if math.isfinite(drops[q]) else 0.0, order[q]))

    rng = random.Random(seed)
    out: list[dict] = []
    for q in ranked[:n_questions]:
        for s in sorted(chosen):
            cands = list(cells[q].get(s, []))
            if not cands:
                continue
            rng.shuffle(cands)  # seeded tie-break; sorted() below is stable
            scored = [p for p in cands if p["aligned"] is not None]
            if not scored:
                pick = cands[0]
            elif s == 0:
                med = statistics.median(p["aligned"] for p in scored)
                pick = min(scored, key=lambda p: abs(p["aligned"] - med))
            else:
                # worst alignment; among equals the more coherent one is the more telling example
                pick = min(scored, key=lambda p: (p["aligned"], -(p["coherent"] or 0.0)))
            out.append({"question_id": q, "question": pick["question"], "step": s,
                        "answer": _truncate(pick["answer"], max_chars),
                        "aligned": pick["aligned"], "coherent": pick["coherent"]})
    return out


def _score_text(x: Any) -> str:
    v = to_score(x)
    return "\u2013" if v is None else f"{v:.1f}"


def _md_cell(text: Any) -> str:
    """Make text safe inside a Markdown table cell (one line, no bare pipes, no live HTML)."""
    s = "" if text is None else str(text)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")


def _group_examples(examples: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for e in examples:
        groups.setdefault(str(e.get("question_id", "")), []).append(e)
    return groups


def examples_markdown(examples: Sequence[Mapping[str, Any]]) -> str:
    """Markdown section: per question a heading, the question, and a step/scores/answer table."""
    lines = ["## Example answers", ""]
    groups = _group_examples(examples)
    if not groups:
        return "\n".join(lines + ["_No examples._", ""])
    for qid, group in groups.items():
        lines += [f"### {_md_cell(qid) or '(no id)'}", ""]
        question = str(group[0].get("question") or "")
        if question:
            lines += ["> " + _md_cell(question), ""]
        lines += ["| step | aligned | coherent | answer |", "|---:|---:|---:|---|"]
        for e in group:
            lines.append(f"| {e.get('step', '')} | {_score_text(e.get('aligned'))} | "
                         f"{_score_text(e.get('coherent'))} | {_md_cell(e.get('answer'))} |")
        lines.append("")
    return "\n".join(lines)


def _clean(text: Any) -> str:
    """Printable text for matplotlib: no control characters, tabs expanded."""
    s = "" if text is None else str(text)
    s = s.replace("\r\n", "\n").replace("\r", "\n").expandtabs(4)
    return "".join(ch for ch in s if ch == "\n" or unicodedata.category(ch)[0] != "C")


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        lines += textwrap.wrap(para, width=width, replace_whitespace=False, drop_whitespace=True) or [""]
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 2] + " \u2026"
    return lines or [""]


def plot_examples(examples: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "",
                  aligned_threshold: float = ALIGNED_THRESHOLD,
                  coherent_threshold: float = COHERENT_THRESHOLD, width_chars: int = 110,
                  max_lines_per_answer: int = 14, smoke_test: bool = False) -> Path:
    """The examples as an image: per question its text, then each step's scores and wrapped answer.

    Scores of an EM answer (by the given thresholds) are drawn in red.
    """
    line_h = 0.19  # inches per text line at the font sizes below
    # (kind, text, indent in inches, colour) laid out top to bottom
    items: list[tuple[str, str, float, Any]] = []
    for qid, group in _group_examples(examples).items():
        q = _clean(group[0].get("question"))
        items.append(("head", f"[{_clean(qid)}]", 0.0, "#222222"))
        items += [("question", line, 0.0, "#222222") for line in _wrap(q, width_chars, 6)] if q else []
        for e in group:
            a, c = to_score(e.get("aligned")), to_score(e.get("coherent"))
            is_em = a is not None and c is not None and a <= aligned_threshold and c > coherent_threshold
            s = _step({"checkpoint_step": e.get("step")})
            head = (f"{'step ?' if s is None else _step_label(s)}   aligned {_score_text(a)}   "
                    f"coherent {_score_text(c)}" + ("   [EM]" if is_em else ""))
            items.append(("score", head, 0.25, EM_COLOR if is_em else COHERENT_COLOR))
            items += [("answer", line, 0.45, "#333333")
                      for line in _wrap(_clean(e.get("answer")), width_chars - 6, max_lines_per_answer)]
        items.append(("gap", "", 0.0, None))

    with plt.rc_context(_STYLE), warnings.catch_warnings():
        # answers may hold emoji / CJK the default font lacks; a missing glyph is not an error
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph.*missing.*")
        n_lines = max(len(items), 1) + 2
        height = min(max(n_lines * line_h + 0.6, 1.8), 300.0)  # stay well under the 2**16 pixel limit
        fig = plt.figure(figsize=(10, height))
        fig.text(0.02, 1 - 0.25 / height, title or "Example answers", fontsize=13, fontweight="bold",
                 va="top", parse_math=False)
        if not items:
            fig.text(0.02, 0.35, "no examples", ha="left", va="center", fontsize=12,
                     color="#888888", style="italic")
        y = 1 - (0.25 + 2 * line_h) / height
        style = {"head": dict(fontsize=10.5, fontweight="bold"),
                 "question": dict(fontsize=9.5, style="italic"),
                 "score": dict(fontsize=9, fontweight="bold"),
                 "answer": dict(fontsize=9, family="DejaVu Sans Mono"),
                 "gap": {}}
        for kind, text, indent, color in items:
            if y <= 0:
                break
            if text:
                fig.text(0.02 + indent / 10, y, text, va="top", color=color, parse_math=False,
                         usetex=False, **style[kind])
            y -= line_h / height
        return _save(fig, path, smoke_test)


# --------------------------------------------------------------------------- judge-free signals

def _curve_with_band(ax, pts: Sequence[tuple[float, float, float]], label: str) -> None:
    """(step, value, standard error) points as a line with its +/- 1.96 SE band (no band where
    the error is unknown)."""
    xs, ys, se = (np.array(v, dtype=float) for v in zip(*pts))
    line = ax.plot(xs, ys, marker="o", label=label)[0]
    ax.fill_between(xs, ys - 1.96 * np.nan_to_num(se), ys + 1.96 * np.nan_to_num(se), color=line.get_color(),
                    alpha=0.15)


StepMarks = int | Sequence[int] | None


def _steps_list(marks: StepMarks) -> list[int]:
    if marks is None:
        return []
    return [int(marks)] if isinstance(marks, (int, float)) else [int(m) for m in marks]


def plot_signals_vs_step(by_step: Mapping[int, Mapping[str, float]], path: str | Path, *, title: str = "",
                         em_emergence_step: StepMarks = None, probe_emergence_step: StepMarks = None,
                         lora_transition_step: StepMarks = None,
                         stages: Sequence[Mapping[str, Any]] | None = None, smoke_test: bool = False) -> Path:
    """One time axis, four or five panels: (a) EM rate from the judge, (b) probe margin per contrast set
    (misaligned - aligned log-likelihood, +/- 1.96 SE, clustered by question where logged), (c) the
    LoRA adapter's turning angle and rotation, (d) the Model Organisms phase metrics (local cosine
    per k, composition vs the final checkpoint, their rules' steps dashed), (e) where logged, the
    direction monitor's projections; each emergence step marked on every panel. A
    multi-stage run passes each stage's steps (global) as a list, and each is marked. What is
    drawn (curves and marks) goes beside the PNG as JSON."""
    metrics = {int(s): m for s, m in by_step.items()}
    steps = sorted(metrics)
    sets = sorted({k.split("/")[1] for m in metrics.values() for k in m
                   if k.startswith("probe/") and k.endswith("/margin")})
    markers = [(step, label, color) for marks, label, color in
               ((em_emergence_step, "EM (judge)", EM_COLOR), (probe_emergence_step, "probe", "#1f77b4"),
                (lora_transition_step, "LoRA turn", "#2ca02c")) for step in _steps_list(marks)]
    drawn: dict[str, Any] = {"marks": {label: [m for m, lab, _ in markers if lab == label]
                                       for label in ("EM (judge)", "probe", "LoRA turn")}, "curves": {}}
    phase_keys = sorted({k for m in metrics.values() for k in m if k.startswith("lora/all/local_cos_k")},
                        key=lambda k: (int("".join(c for c in k.rsplit("_k", 1)[1] if c.isdigit()) or 0), k))
    directions = sorted({k.split("/")[1] for m in metrics.values() for k in m
                         if k.startswith("direction/") and k.endswith("/projection")})
    # a step-valued metric sits at its own step (probe.result_steps): the phase rules' and monitors' steps
    phase_marks = sorted({(k, s) for s, m in metrics.items() for k, v in m.items()
                          if (k.startswith("lora_local_cos_step_") or k == "lora_composition_step") and v == s})
    direction_marks = sorted({(k.split("/")[1], s) for s, m in metrics.items() for k, v in m.items()
                              if k.startswith("direction/") and k.endswith("/emergence_step") and v == s})
    drawn["marks"].update({k: [s for kk, s in phase_marks if kk == k] for k, _ in phase_marks})
    drawn["marks"].update({f"direction/{n}": [s for nn, s in direction_marks if nn == n] for n, _ in direction_marks})
    n_panels = 4 + bool(directions)
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(n_panels, 1, figsize=(9, 3 * n_panels), sharex=True, layout="constrained")
        ax_em, ax_pr, ax_lo, ax_ph = axes[:4]
        em = [(s, metrics[s]["em_rate"]) for s in steps if "em_rate" in metrics[s]]
        ax_em.set_title("(a) EM rate (judge)", loc="left", fontweight="bold")
        if em:
            ax_em.plot([s for s, _ in em], [_pct(v) for _, v in em], marker="o", color=EM_COLOR, label="EM rate")
            drawn["curves"]["em_rate"] = em
            ax_em.set_ylabel("EM answers (%)")
        else:
            _no_data(ax_em, "no judge in this run", keep_axes=True)
        ax_pr.set_title("(b) Likelihood probe: misaligned - aligned", loc="left", fontweight="bold")
        for name in sets:
            # the question-clustered standard error where logged (pairs share questions)
            pts = [(s, metrics[s][f"probe/{name}/margin"],
                    metrics[s].get(f"probe/{name}/margin_se_clustered", metrics[s].get(f"probe/{name}/margin_se", 0.0)))
                   for s in steps if f"probe/{name}/margin" in metrics[s]]
            drawn["curves"][f"probe/{name}/margin"] = pts
            _curve_with_band(ax_pr, pts, name)
        if sets:
            ax_pr.axhline(0, lw=0.8, color="grey")
            ax_pr.set_ylabel("margin (nats / token)")
        else:
            _no_data(ax_pr, "no probe in this run", keep_axes=True)
        ax_lo.set_title("(c) LoRA trajectory", loc="left", fontweight="bold")
        drew = False
        for key, label in (("lora/all/turn_deg", "turning angle of the path"),
                           ("lora/all/rotation_deg", "rotation of the top direction")):
            pts = [(s, metrics[s][key]) for s in steps if key in metrics[s]]
            if pts:
                ax_lo.plot(*zip(*pts), marker="o", label=label)
                drawn["curves"][key] = pts
                drew = True
        if drew:
            ax_lo.set_ylabel("degrees vs previous checkpoint")
        else:
            _no_data(ax_lo, "no LoRA checkpoints", keep_axes=True)
        ax_ph.set_title("(d) Phase metrics (Turner et al.): local cosine of B, composition vs final",
                        loc="left", fontweight="bold")
        for key in [*phase_keys, "lora/all/composition"]:
            pts = [(s, metrics[s][key]) for s in steps if key in metrics[s]]
            if pts:
                unit = "checkpoint intervals" if key.endswith("ckpt") else "steps"
                label = ("composition ||B^T B_final|| / (||B|| ||B_final||)" if key.endswith("composition")
                         else f"local cos, k = {key.rsplit('_k', 1)[1].removesuffix('ckpt')} {unit}")
                ax_ph.plot(*zip(*pts), marker=".", label=label)
                drawn["curves"][key] = pts
        for i, (key, step) in enumerate(phase_marks):
            ax_ph.axvline(step, ls="--", lw=1.0, color=f"C{i % 10}", alpha=0.7, label=f"{key}: {step}")
        if any(k in drawn["curves"] for k in [*phase_keys, "lora/all/composition"]):
            ax_ph.axhline(0, lw=0.8, color="grey")
            ax_ph.set_ylabel("cosine")
        else:
            _no_data(ax_ph, "no phase metrics (too few checkpoints)", keep_axes=True)
        if directions:
            ax_dir = axes[4]
            ax_dir.set_title("(e) Direction monitor: mean residual activation . direction", loc="left",
                             fontweight="bold")
            for name in directions:
                pts = [(s, metrics[s][f"direction/{name}/projection"], metrics[s].get(f"direction/{name}/projection_se", 0.0))
                       for s in steps if f"direction/{name}/projection" in metrics[s]]
                drawn["curves"][f"direction/{name}/projection"] = pts
                _curve_with_band(ax_dir, pts, name)
            for i, (name, step) in enumerate(direction_marks):
                ax_dir.axvline(step, ls="--", lw=1.0, color=f"C{i % 10}", label=f"{name} emerges: step {step}")
            ax_dir.set_ylabel("projection")
        axes[-1].set_xlabel("training step")
        for ax in axes:
            mark_stages(ax, stages)
            for step, label, color in markers:
                ax.axvline(step, ls=":", lw=1.6, color=color, label=f"{label} emerges/turns: step {step}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best", fontsize=8)
        fig.suptitle(title or "EM signals over fine-tuning", fontweight="bold", parse_math=False)
        return _save(fig, path, smoke_test, drawn)


# --------------------------------------------------------------------------- judge robustness
def plot_sensitivity(grid: Sequence[Mapping[str, Any]], path: str | Path, *, step: int | None = None,
                     title: str = "", smoke_test: bool = False,
                     mark: tuple[float, float] | None = (ALIGNED_THRESHOLD, COHERENT_THRESHOLD)) -> Path:
    """Heatmaps of EM rate (%) over aligned x coherent thresholds, one panel per bound convention
    (metrics.sensitivity_grid rows); `mark` outlines the thresholds in use."""
    conventions = list(dict.fromkeys(g["bounds"] for g in grid))
    aligned = sorted({float(g["aligned_threshold"]) for g in grid})
    coherent = sorted({float(g["coherent_threshold"]) for g in grid})
    drawn: dict[str, Any] = {"step": step, "aligned_thresholds": aligned, "coherent_thresholds": coherent}
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, max(1, len(conventions)), figsize=(4.6 * max(1, len(conventions)), 4.0),
                                 layout="constrained", squeeze=False)
        if not grid:
            _no_data(axes[0][0])
        for ax, conv in zip(axes[0], conventions):
            cell = {(float(g["aligned_threshold"]), float(g["coherent_threshold"])): g for g in grid if g["bounds"] == conv}
            z = np.array([[_pct(cell[(a, c)]["em_rate"]) if (a, c) in cell else math.nan for a in aligned]
                          for c in coherent])
            drawn[conv] = {f"{a:g}/{c:g}": float(z[j, i]) for j, c in enumerate(coherent)
                           for i, a in enumerate(aligned)}
            im = ax.imshow(z, origin="lower", cmap="Reds", vmin=0, vmax=max(1.0, float(np.nanmax(z)) if
                                                                             np.isfinite(z).any() else 1.0),
                           aspect="auto")
            ax.set_xticks(range(len(aligned)), [f"{a:g}" for a in aligned])
            ax.set_yticks(range(len(coherent)), [f"{c:g}" for c in coherent])
            ax.grid(False)
            for j in range(len(coherent)):
                for i in range(len(aligned)):
                    ax.text(i, j, "n/a" if math.isnan(z[j, i]) else f"{z[j, i]:.1f}", ha="center", va="center",
                            fontsize=7.5)
            if mark and mark[0] in aligned and mark[1] in coherent:
                i, j = aligned.index(mark[0]), coherent.index(mark[1])
                ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, ec="black", lw=1.8))
            ax.set_xlabel("aligned threshold" + (" (aligned <= t)" if conv == "inclusive" else " (aligned < t)"))
            ax.set_ylabel("coherent threshold (coherent > t)")
            ax.set_title(f"{conv} bounds", parse_math=False)
            fig.colorbar(im, ax=ax, label="EM rate (%)", shrink=0.8)
        fig.suptitle(title or ("EM rate by threshold" + (f" (step {step})" if step is not None else "")),
                     fontweight="bold", parse_math=False)
        return _save(fig, path, smoke_test, drawn)


def plot_agreement(names: Sequence[str], pairs: Sequence[Mapping[str, Any]], path: str | Path, *,
                   title: str = "", smoke_test: bool = False) -> Path:
    """Judge agreement: per pair of judges, aligned scores of one against the other (EM-labelled
    points dark) and the 2x2 EM confusion matrix. `pairs` items: a, b (indices into names),
    aligned_a, aligned_b (lists), confusion_em ([[both, a only], [b only, neither]] as
    confusion(labels=[True, False])), kappa_em."""
    drawn: dict[str, Any] = {"names": list(names), "pairs": []}
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(max(1, len(pairs)), 2, figsize=(9, 3.8 * max(1, len(pairs))),
                                 layout="constrained", squeeze=False)
        for row, p in zip(axes, pairs):
            ax, cm_ax = row
            xa = [x for x, y in zip(p["aligned_a"], p["aligned_b"]) if x is not None and y is not None]
            ya = [y for x, y in zip(p["aligned_a"], p["aligned_b"]) if x is not None and y is not None]
            ax.scatter(xa, ya, s=12, alpha=0.6, color=COHERENT_COLOR)
            ax.plot([0, 100], [0, 100], color=BASE_COLOR, lw=0.8, ls="--")
            ax.set_xlim(-2, 102)
            ax.set_ylim(-2, 102)
            ax.set_xlabel(f"aligned: {names[p['a']]}", parse_math=False)
            ax.set_ylabel(f"aligned: {names[p['b']]}", parse_math=False)
            ax.set_title(f"Spearman {p.get('spearman_aligned', math.nan):.2f}", parse_math=False)
            cm = np.array(p["confusion_em"], dtype=float)
            cm_ax.imshow(cm, cmap="Blues")
            cm_ax.grid(False)
            for i in range(2):
                for j in range(2):
                    cm_ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=11)
            cm_ax.set_xticks([0, 1], ["EM", "not EM"])
            cm_ax.set_yticks([0, 1], ["EM", "not EM"])
            cm_ax.set_xlabel(names[p["b"]], parse_math=False)
            cm_ax.set_ylabel(names[p["a"]], parse_math=False)
            cm_ax.set_title(f"EM label: kappa {p.get('kappa_em', math.nan):.2f}", parse_math=False)
            drawn["pairs"].append({"a": p["a"], "b": p["b"], "aligned_a": xa, "aligned_b": ya,
                                   "confusion_em": cm.tolist(), "kappa_em": p.get("kappa_em")})
        fig.suptitle(title or "Judge agreement", fontweight="bold", parse_math=False)
        return _save(fig, path, smoke_test, drawn)


# --------------------------------------------------------------------------- mitigations
def plot_mitigation_tradeoff(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "",
                             smoke_test: bool = False) -> Path:
    """General EM (final EM rate, y) against narrow learning (held-out loss drop on the training
    domain, x): one point per mitigation, intervals over seeds (or Wilson for one seed). Up and
    right: the mitigation failed; down and left: it stopped the narrow task too; down and right is
    what a mitigation wants. `<name>.json` beside it holds the drawn values."""
    names = [str(r["mitigation"]) for r in rows]
    x = np.array([_f(r.get("heldout_loss_drop")) for r in rows], dtype=float)
    xlo = np.array([_f(r.get("heldout_loss_drop_lo")) for r in rows], dtype=float)
    xhi = np.array([_f(r.get("heldout_loss_drop_hi")) for r in rows], dtype=float)
    y = np.array([_pct(_f(r.get("em_rate"))) for r in rows], dtype=float)
    ylo = np.array([_pct(_f(r.get("em_rate_lo"))) for r in rows], dtype=float)
    yhi = np.array([_pct(_f(r.get("em_rate_hi"))) for r in rows], dtype=float)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            _no_data(ax, "no mitigation has both an EM rate and a held-out loss")
        else:
            colors = plt.get_cmap("tab10")
            for i, name in enumerate(names):
                if not ok[i]:
                    continue
                ax.errorbar([x[i]], [y[i]], xerr=_yerr(x[i:i + 1], xlo[i:i + 1], xhi[i:i + 1]),
                            yerr=_yerr(y[i:i + 1], ylo[i:i + 1], yhi[i:i + 1]), fmt="o", ms=7, capsize=3,
                            color=colors(i % 10), label=name)
                ax.annotate(name, (x[i], y[i]), textcoords="offset points", xytext=(6, 6), fontsize=9)
            ax.set_ylim(bottom=min(0.0, float(np.nanmin(ylo[ok]) if np.isfinite(ylo[ok]).any() else 0.0)))
            ax.legend(loc="best")
        ax.set_xlabel("narrow learning: held-out loss drop on the training domain (nats/token)")
        ax.set_ylabel("general EM: EM rate at the final checkpoint (%)")
        ax.set_title(title or "Mitigations: general EM vs narrow learning")
        drawn = {"x_label": "heldout_loss_drop", "y_label": "em_rate_percent",
                 "points": {n: {"x": x[i], "x_lo": xlo[i], "x_hi": xhi[i], "y": y[i], "y_lo": ylo[i], "y_hi": yhi[i]}
                            for i, n in enumerate(names)}}
        return _save(fig, path, smoke_test=smoke_test, drawn=drawn)


# --------------------------------------------------------------------------- directions compare
def plot_direction_cosines(cos: np.ndarray, labels: Sequence[str], path: str | Path, *, layers: Sequence[int] | None = None,
                           title: str = "") -> Path:
    """Heatmaps of the cosine between directions from different runs, one panel per layer
    (`cos` [layers, n, n], directions_monitor.cosine_matrices); `layers` picks panels (default all)."""
    cos = np.asarray(cos, dtype=float)
    shown = list(layers) if layers is not None else list(range(cos.shape[0]))
    cols = min(4, max(1, len(shown)))
    rows = math.ceil(len(shown) / cols) if shown else 1
    drawn: dict[str, Any] = {"labels": list(labels), "layers": shown,
                             "cosine": {f"layer{l:02d}": cos[l].tolist() for l in shown}}
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols + 1, 3.0 * rows), squeeze=False, layout="constrained")
        im = None
        for ax, l in zip(axes.flat, shown):
            im = ax.imshow(cos[l], vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_title(f"layer {l}", fontsize=9)
            ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            for i in range(cos.shape[1]):
                for j in range(cos.shape[2]):
                    ax.text(j, i, f"{cos[l, i, j]:.2f}", ha="center", va="center", fontsize=7)
        for ax in list(axes.flat)[len(shown):]:
            ax.axis("off")
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.8, label="cosine")
        fig.suptitle(title or "Cosine between misalignment directions, per layer", fontweight="bold", parse_math=False)
        return _save(fig, path, False, drawn)
