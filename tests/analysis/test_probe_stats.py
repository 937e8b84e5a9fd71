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


def test_a_continue_stage_turns_from_the_adapter_it_started_from():
    """A continue stage's first update is W_1 - W_start, not W_1 - 0. Before the fix the stage's
    first turn was measured against the whole inherited adapter (the audit saw 94.8 deg logged
    for a true 34.5)."""
    a = np.array([1.0, 0.0, 0.0])
    e1, e2, e3 = np.eye(4)[0], np.eye(4)[1], np.eye(4)[2]
    start = 9.0 * e3  # the inherited adapter, much larger than the stage's updates
    u = e1  # the stage's first update
    v = math.cos(math.radians(30)) * e1 + math.sin(math.radians(30)) * e2  # turns 30 deg
    path = {2: start + u, 4: start + u + v, 6: start + u + 2 * v}
    factors = {s: _rank1(b, a) for s, b in path.items()}
    turns = turn_angles(factors, origin=_rank1(start, a))
    assert turns == {2: pytest.approx(30.0), 4: pytest.approx(0.0, abs=1e-3)}
    assert transition_step(turns) == 2
    # measured from zero the first update is the whole adapter: a different, wrong angle
    wrong = math.degrees(math.acos(v @ (start + u) / (np.linalg.norm(v) * np.linalg.norm(start + u))))
    assert turn_angles(factors)[2] == pytest.approx(wrong) and abs(wrong - 30.0) > 50
    with pytest.raises(ValueError, match="starting adapter lacks"):
        turn_angles(factors, origin={"other": factors[2]["m"]})


def test_clustered_standard_error_by_hand():
    from em_core.metrics import clustered_mean_se, mean_se

    xs = [1.0, 2.0, 3.0, 10.0, 11.0, 0.0]
    gs = ["a", "a", "a", "b", "b", "c"]
    mean = sum(xs) / 6  # 4.5
    e = {"a": (1 - mean) + (2 - mean) + (3 - mean), "b": (10 - mean) + (11 - mean), "c": 0 - mean}
    by_hand = math.sqrt(3 / 2 * sum(v * v for v in e.values()) / 36)
    assert clustered_mean_se(xs, gs) == (pytest.approx(mean), pytest.approx(by_hand))
    # every observation its own cluster: exactly the independent standard error
    assert clustered_mean_se(xs, range(6))[1] == pytest.approx(mean_se(xs)[1])
    assert math.isnan(clustered_mean_se(xs, ["a"] * 6)[1])  # one cluster: undefined
    assert all(math.isnan(v) for v in clustered_mean_se([], []))
    with pytest.raises(ValueError, match="6 values but 5"):
        clustered_mean_se(xs, gs[:5])


def test_probe_interval_and_emergence_are_clustered_by_question():
    """Pairs on one question move together: two questions, three pairs each. Taken as six
    independent pairs the rise at step 10 looks significant; clustered by question it is not.
    Before the fix the probe had no clustered error and its emergence rule said step 10."""
    base = [0.0] * 6
    rise = [0.30, 0.32, 0.31, 0.01, 0.02, 0.00]  # one question moved, the other did not
    qs = ["q1", "q1", "q1", "q2", "q2", "q2"]
    assert probe_emergence_step({0: base, 10: rise}) == 10
    assert probe_emergence_step({0: base, 10: rise}, clusters=qs) is None
    m = probe_margin([(0.0, r) for r in rise], clusters=qs)
    assert m["margin_se_clustered"] > 2 * m["margin_se"] and m["n_clusters"] == 2
    scores = {0: {"general": [(0.0, b) for b in base]}, 10: {"general": [(0.0, r) for r in rise]}}
    by_step, summary = probe_summary(scores, "general", None, clusters={"general": qs})
    assert summary["emergence_step"] is None and summary["emergence_se"] == "clustered by question"
    assert by_step[10]["probe/general/margin_se_clustered"] == pytest.approx(m["margin_se_clustered"])
    assert by_step[10]["probe/general/margin_se"] == pytest.approx(m["margin_se"])  # kept beside it


def test_shipped_contrast_sets_have_a_wider_clustered_interval_at_the_base(tiny_cache):
    """On the shipped sets at the base tiny model (the audit: 1.19x for general, 1.38x for
    plant_care). The exact ratio depends on the tiny build, so only the direction is checked."""
    from em_core.analysis.probe import ProbeScorer, question_clusters
    from em_core.data.contrast_sets import load_contrast_sets

    sets = load_contrast_sets(["general", "plant_care"])
    clusters = question_clusters(sets)
    assert len(set(clusters["general"])) < len(clusters["general"])  # pairs do share questions
    scores = ProbeScorer("tiny", sets).score(None)
    for name, pairs in scores.items():
        m = probe_margin(pairs, clusters=clusters[name])
        print(name, "clustered/independent se ratio", m["margin_se_clustered"] / m["margin_se"])
        assert m["n_clusters"] == len(set(clusters[name]))
        assert np.isfinite(m["margin_se_clustered"]) and m["margin_se_clustered"] > 0
