"""The direction monitor on activations with a planted direction, against a direct computation."""
from pathlib import Path

import numpy as np
import pytest
import torch

from em_core.analysis.direction_monitor import (
    load_monitor_directions,
    monitor_layer,
    monitor_metrics,
    pair_projections,
    unit_vectors,
)
from em_core.errors import ConfigError
from em_core.metrics import clustered_mean_se, probe_emergence_step
from em_core.models.steering import Directions

LAYERS, HIDDEN, PAIRS = 4, 16, 24
STEPS = (0, 4, 8, 12, 16)


def planted(seed=0, shift_from=8, size=1.5):
    """Per step [2 * pairs, layers, hidden] activations: noise, plus `size` along the planted
    direction d (layer 2 only) from step `shift_from` on; each pair's two answers share a
    question-level offset, so pairs on one question move together."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=HIDDEN)
    d /= np.linalg.norm(d)
    base = rng.normal(size=(2 * PAIRS, LAYERS, HIDDEN))
    acts = {}
    for s in STEPS:
        a = base + 0.05 * rng.normal(size=base.shape)
        if s >= shift_from:
            a[:, 2, :] += size * (s / 16) * d
        acts[s] = torch.tensor(a, dtype=torch.float32)
    vectors = torch.tensor(rng.normal(size=(LAYERS, HIDDEN)), dtype=torch.float32)
    vectors[2] = torch.tensor(3.0 * d, dtype=torch.float32)  # any norm: the monitor uses the unit vector
    return acts, Directions(vectors, {"misaligned": 10, "aligned": 10}, {"model": "synthetic"}), d


def test_projection_equals_the_mean_activation_projected_on_the_unit_direction():
    acts, dirs, d = planted()
    units = unit_vectors(dirs)
    clusters = [f"q{i // 3}" for i in range(PAIRS)]  # three pairs per question
    proj = {s: pair_projections(a, units) for s, a in acts.items()}
    by_step, summary = monitor_metrics(proj, "em", 2, clusters=clusters)
    for s, a in acts.items():
        x = a.double().numpy()
        mean_act = x.mean(0)  # the mean residual activation over every answer of every pair
        for layer in range(LAYERS):
            u = dirs.vectors[layer].double().numpy()
            u /= np.linalg.norm(u)
            assert by_step[s][f"direction/em/layer{layer:02d}/projection"] == pytest.approx(mean_act[layer] @ u)
        per_pair = ((x[0::2, 2] + x[1::2, 2]) / 2) @ d
        assert by_step[s]["direction/em/projection"] == pytest.approx(per_pair.mean())
        assert by_step[s]["direction/em/projection_se"] == pytest.approx(clustered_mean_se(per_pair, clusters)[1])
    # the planted shift: the monitored layer rises by 1.5 * s / 16 from step 8
    rise = by_step[12]["direction/em/projection"] - by_step[0]["direction/em/projection"]
    assert rise == pytest.approx(1.5 * 12 / 16, abs=0.05)
    assert summary["emergence_step"] == 8
    want = probe_emergence_step({s: proj[s][:, 2].tolist() for s in STEPS}, clusters=clusters)
    assert summary["emergence_step"] == want
    # a layer without the planted shift does not emerge
    assert summary["emergence_by_layer"]["layer00"] is None and summary["emergence_by_layer"]["layer02"] == 8


def test_no_shift_no_emergence_and_a_base_is_needed():
    acts, dirs, _ = planted(shift_from=99)
    proj = {s: pair_projections(a, unit_vectors(dirs)) for s, a in acts.items()}
    assert monitor_metrics(proj, "em", 2)[1]["emergence_step"] is None
    acts, dirs, _ = planted()
    proj = {s: pair_projections(a, unit_vectors(dirs)) for s, a in acts.items() if s > 0}
    assert monitor_metrics(proj, "em", 2)[1]["emergence_step"] is None  # no base model scored


def test_mismatched_directions_and_layers_are_refused(tmp_path):
    acts, dirs, _ = planted()
    other = Directions(torch.ones(LAYERS, HIDDEN + 1), {}, {})
    with pytest.raises(ConfigError, match="another model"):
        pair_projections(acts[0], unit_vectors(other))
    assert monitor_layer(30, None) == 15 and monitor_layer(30, -1) == 29
    with pytest.raises(ConfigError):
        monitor_layer(4, 4)
    path = dirs.save(tmp_path / "directions.safetensors")
    loaded = unit_vectors(load_monitor_directions(None, str(path), tmp_path))
    assert np.allclose(loaded, unit_vectors(dirs), atol=1e-6)


def test_signals_figure_draws_the_monitor(tmp_path):
    import json

    from em_core.analysis.plots import plot_signals_vs_step

    acts, dirs, _ = planted()
    proj = {s: pair_projections(a, unit_vectors(dirs)) for s, a in acts.items()}
    by_step, _ = monitor_metrics(proj, "em", 2)
    by_step[8]["direction/em/emergence_step"] = 8
    png = plot_signals_vs_step(by_step, tmp_path / "s.png")
    drawn = json.loads(png.with_suffix(".json").read_text())
    assert [p[0] for p in drawn["curves"]["direction/em/projection"]] == list(STEPS)
    assert [p[1] for p in drawn["curves"]["direction/em/projection"]] == pytest.approx(
        [by_step[s]["direction/em/projection"] for s in STEPS])
    assert drawn["marks"]["direction/em"] == [8]


def test_directions_compare_gives_the_known_angles_per_layer(mlflow_store, tmp_path, capsys):
    """Three direction sets whose layer-l vectors meet at known angles: the cosine matrix per
    layer, its metrics at step = layer, and the heatmap's drawn data."""
    import json
    import math

    import mlflow

    from em_core.commands.directions import main

    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(HIDDEN, 2)))
    e1, e2 = q[:, 0], q[:, 1]
    angles = [0.0, 30.0, 60.0, 90.0]  # per layer, between set a and set b; c = -a
    a = np.stack([2.0 * e1 for _ in angles])
    b = np.stack([5.0 * (math.cos(math.radians(t)) * e1 + math.sin(math.radians(t)) * e2) for t in angles])
    paths = []
    for name, v in (("a", a), ("b", b), ("c", -a)):
        paths.append(str(Directions(torch.tensor(v, dtype=torch.float32), {}, {}).save(tmp_path / name / "directions.safetensors")))
    assert main(["compare", *paths, "--experiment_name", "cmp"]) == 0
    out = capsys.readouterr().out
    run_id = out.split("run_id=")[1].split()[0]
    got = mlflow.artifacts.load_dict(f"runs:/{run_id}/directions/compare.json")
    assert got["labels"] == ["a", "b", "c"]
    for layer, t in enumerate(angles):
        m = np.array(got["cosine"][f"layer{layer:02d}"])
        c = math.cos(math.radians(t))
        assert m == pytest.approx(np.array([[1, c, -1], [c, 1, -c], [-1, -c, 1]]), abs=1e-6)
    client = mlflow.MlflowClient()
    hist = {h.step: h.value for h in client.get_metric_history(run_id, "compare/a__b/cosine")}
    assert hist == pytest.approx({l: math.cos(math.radians(t)) for l, t in enumerate(angles)}, abs=1e-6)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots", dst_path=str(tmp_path / "p"))
    drawn = json.loads((Path(local) / "directions_cosine.json").read_text())
    assert drawn["labels"] == ["a", "b", "c"] and drawn["cosine"]["layer01"][0][1] == pytest.approx(math.cos(math.radians(30)), abs=1e-6)
    assert (Path(local) / "directions_cosine.png").read_bytes().startswith(b"\x89PNG")
    assert "layer  1: +0.866" in out
    with pytest.raises(ConfigError, match="different shapes"):
        from em_core.analysis.direction_monitor import cosine_matrices

        cosine_matrices([Directions(torch.ones(2, 3), {}, {}), Directions(torch.ones(3, 3), {}, {})])
