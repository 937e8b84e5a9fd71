"""Pure statistics of the probe and the LoRA trajectory, on hand-made numbers."""
import math

import numpy as np
import pytest

from em_core.analysis.lora_trajectory import (
    LoraFactors,
    top_direction,
    transition_step,
    turn_angles,
)
from em_core.analysis.probe import probe_summary
from em_core.metrics import probe_breadth, probe_emergence_step, probe_margin, spearman


def test_margin_share_and_wilson():
    m = probe_margin([(-2.0, -1.0), (-2.0, -3.0), (-1.0, 0.0), (-4.0, -2.0)])
    assert m["margin"] == pytest.approx((1 - 1 + 1 + 2) / 4)
    assert m["margin_se"] == pytest.approx(np.std([1, -1, 1, 2], ddof=1) / 2)
    assert m["prefers_misaligned"] == 0.75 and m["n_pairs"] == 4
    assert m["prefers_misaligned_lo"] == pytest.approx(0.3006, abs=1e-3)
    assert m["prefers_misaligned_hi"] == pytest.approx(0.9544, abs=1e-3)


def test_emergence_is_paired_and_needs_the_lower_bound_above_zero():
    base = [0.0, 0.1, -0.1, 0.0]
    by_step = {0: base, 10: [0.1, 0.0, 0.1, 0.0], 20: [1.0, 1.2, 0.8, 1.1], 30: [2.0] * 4}
    assert probe_emergence_step(by_step) == 20
    assert probe_emergence_step(by_step, z=100) is None
    assert probe_emergence_step({10: [1.0]}) is None  # no base model
    with pytest.raises(ValueError, match="not the same pairs"):
        probe_emergence_step({0: base, 10: [1.0]})


def test_breadth_and_spearman():
    assert probe_breadth(0.0, 0.5, -1.0, 1.0) == 0.25
    assert math.isnan(probe_breadth(0.0, 0.5, 1.0, 1.0))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_probe_summary_logs_breadth_and_emergence_per_set():
    scores = {0: {"general": [(-1.0, -2.0)] * 3, "plant": [(-1.0, -3.0), (-1.0, -2.0), (-1.0, -2.5)]},
              5: {"general": [(-1.0, -1.5), (-1.0, -1.6), (-1.0, -1.4)],
                  "plant": [(-1.0, 0.0), (-1.0, 0.5), (-1.0, -0.2)]}}
    by_step, summary = probe_summary(scores, "general", "plant")
    assert by_step[0]["probe/general/margin"] == -1.0 and by_step[0]["probe/plant/margin"] == -1.5
    assert by_step[5]["probe/breadth"] == pytest.approx((-0.5 - -1.0) / (1.1 - -1.5))
    assert summary["emergence_by_set"] == {"general": 5, "plant": 5} and summary["emergence_step"] == 5


def test_top_direction_matches_dense_svd():
    rng = np.random.default_rng(0)
    f = LoraFactors(rng.normal(size=(3, 20)), rng.normal(size=(12, 3)), 2.0)
    u, s, _ = np.linalg.svd(2.0 * f.b @ f.a)
    d, s1 = top_direction(f)
    assert s1 == pytest.approx(s[0]) and abs(d @ u[:, 0]) == pytest.approx(1.0)


def _rank1(b: np.ndarray, a: np.ndarray) -> dict[str, LoraFactors]:
    return {"m": LoraFactors(a.reshape(1, -1), b.reshape(-1, 1), 1.0)}


def test_turn_angle_marks_where_the_path_changes_direction():
    # a rank-1 adapter whose B moves along e1 for three checkpoints, then along e2
    a = np.array([1.0, 0.0, 0.0])
    e1, e2 = np.array([1.0, 0, 0, 0]), np.array([0, 1.0, 0, 0])
    path = {3: e1, 6: 2 * e1, 9: 3 * e1, 12: 3 * e1 + e2, 15: 3 * e1 + 2 * e2}
    turns = turn_angles({s: _rank1(b, a) for s, b in path.items()})
    assert turns == {3: pytest.approx(0.0), 6: pytest.approx(0.0), 9: pytest.approx(90.0), 12: pytest.approx(0.0)}
    assert transition_step(turns) == 9
    assert transition_step({}) is None


def test_report_notes_spearman_and_plot_draws_all_three_panels(tmp_path):
    from em_core.analysis.plots import plot_signals_vs_step
    from em_core.analysis.report import signal_notes

    judge = {0: {"em_rate": 0.0}, 4: {"em_rate": 0.1}, 8: {"em_rate": 0.3}, 12: {"em_rate": 0.2}}
    signals = {0: {"probe/general/margin": -1.0, "probe/general/margin_se": 0.1},
               4: {"probe/general/margin": -0.5, "lora/all/turn_deg": 40.0},
               8: {"probe/general/margin": 0.5, "lora/all/turn_deg": 70.0, "lora_transition_step": 8},
               12: {"probe/general/margin": 0.8}}
    (note,) = signal_notes(judge, signals)
    assert "Spearman rho = +0.80" in note and "over 4 checkpoints" in note
    merged = {s: {**judge[s], **signals[s]} for s in judge}
    png = plot_signals_vs_step(merged, tmp_path / "s.png", em_emergence_step=8, lora_transition_step=8).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_pca_of_b_matches_a_dense_svd_of_the_centred_b_trajectory():
    from em_core.analysis.lora_trajectory import pca_of_b

    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 5))
    bs = {s: rng.normal(size=(7, 2)) * s for s in (2, 4, 6, 8)}
    pca = pca_of_b({s: {"m": LoraFactors(a, b, 1.0)} for s, b in bs.items()})
    x = np.stack([bs[s].ravel() for s in sorted(bs)])
    u, sv, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
    assert pca["steps"] == [2, 4, 6, 8]
    assert pca["explained_variance_ratio"] == pytest.approx((sv ** 2 / (sv ** 2).sum())[:3].tolist())
    for i, s in enumerate(sorted(bs)):  # each component's sign is arbitrary
        assert np.abs(pca["coords"][s]) == pytest.approx(np.abs(u[i, :3] * sv[:3]), abs=1e-9)
