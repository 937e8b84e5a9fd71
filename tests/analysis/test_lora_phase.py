"""The Model Organisms phase-transition metrics (local cosine, composition) on a hand-made
LoRA trajectory with a planted turn, against a direct computation."""
import json
import math

import numpy as np
import pytest

from em_core.analysis.lora_trajectory import (
    LoraFactors,
    composition_score,
    phase_k,
    phase_metrics,
    trajectory,
)

TURN = 20


def planted(steps, rank=2, rate=0.01, seed=0):
    """Two modules (layers 0 and 1) of rank `rank`; B moves along D1 up to step TURN, then along
    an orthogonal D2 (a fresh LoRA: B = 0 at step 0). Returns step -> module -> LoraFactors."""
    rng = np.random.default_rng(seed)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    out_dim, in_dim = 8, 6
    q, _ = np.linalg.qr(rng.normal(size=(2 * out_dim * rank, 2)))  # two orthonormal directions
    d1, d2 = q[:, 0].reshape(2, out_dim, rank), q[:, 1].reshape(2, out_dim, rank)
    a = rng.normal(size=(2, rank, in_dim))
    path = {}
    for s in steps:
        b = rate * (min(s, TURN) * d1 + max(s - TURN, 0) * d2)
        path[s] = {n: LoraFactors(a[i], b[i], 2.0) for i, n in enumerate(names)}
    return path


def direct_local_cos(path, k, names=None):
    steps = sorted(path)
    vec = {s: np.concatenate([path[s][n].b.ravel() for n in (names or sorted(path[s]))]) for s in steps}
    vec[0] = np.zeros_like(vec[steps[0]])
    steps = [0] + steps
    out = {}
    for i in range(k, len(steps) - k):
        u, v = vec[steps[i - k]] - vec[steps[i]], vec[steps[i + k]] - vec[steps[i]]
        out[steps[i]] = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return out


def direct_composition(path):
    final = np.vstack([path[max(path)][n].b for n in sorted(path[max(path)])])
    out = {}
    for s in path:
        b = np.vstack([path[s][n].b for n in sorted(path[s])])
        out[s] = float(np.linalg.norm(b.T @ final) / (np.linalg.norm(b) * np.linalg.norm(final)))
    return out


def test_both_rules_find_the_planted_turn_and_match_a_direct_computation():
    path = planted(range(1, 41))
    pm = phase_metrics(path)
    for k in (5, 10, 15):
        got = pm["local_cos"]["all"][f"local_cos_k{k}"]  # checkpoints every step: k in training steps
        want = direct_local_cos(path, k)
        assert got.keys() == want.keys() and got == pytest.approx(want, abs=1e-12)
        assert got[TURN] == pytest.approx(0.0, abs=1e-12)  # a 90-degree turn; a straight path gives -1
        far = [s for s in got if abs(s - TURN) >= k]  # both differences on one straight segment
        assert (far or k == 15) and all(got[s] == pytest.approx(-1.0) for s in far)
        assert all(got[s] < got[TURN] - 0.01 for s in got if s != TURN)  # the unique maximum
        assert pm["steps"][f"lora_local_cos_step_k{k}"] == TURN
    assert pm["composition"]["all"] == pytest.approx(direct_composition(path), abs=1e-12)
    # against itself: sqrt(sum s^4) / sum s^2 over B's singular values (1 only for a rank-1 B)
    sv = np.linalg.svd(np.vstack([path[40][n].b for n in sorted(path[40])]), compute_uv=False)
    assert pm["composition"]["all"][40] == pytest.approx(math.sqrt((sv ** 4).sum()) / (sv ** 2).sum())
    assert phase_metrics(planted(range(1, 41), rank=1))["composition"]["all"][40] == pytest.approx(1.0)
    assert pm["steps"]["lora_composition_step"] == TURN  # the sharpest rise starts at the turn
    # per module too: each module's B turns at the same step (by a module-specific angle)
    for n in path[1]:
        per = pm["local_cos"][n]["local_cos_k5"]
        assert per == pytest.approx(direct_local_cos(path, 5, [n]), abs=1e-12)
        assert max(per.items(), key=lambda kv: kv[1])[0] == TURN


def test_rank1_composition_is_the_absolute_cosine():
    rng = np.random.default_rng(3)
    b, c = rng.normal(size=(9, 1)), rng.normal(size=(9, 1))
    cos = abs(float(b[:, 0] @ c[:, 0])) / (np.linalg.norm(b) * np.linalg.norm(c))
    assert composition_score([b], [c]) == pytest.approx(cos)
    assert composition_score([-b], [c]) == pytest.approx(cos)
    assert math.isnan(composition_score([np.zeros((9, 1))], [c]))


def test_differences_below_the_magnitude_floor_are_ignored():
    pm = phase_metrics(planted(range(1, 41), rate=1e-5))  # every 5-step difference ~5e-5 < 0.002
    assert pm["local_cos"]["all"]["local_cos_k5"] == {}
    assert pm["steps"]["lora_local_cos_step_k5"] is None


def test_k_counts_checkpoint_intervals_when_checkpoints_are_sparse():
    assert phase_k([0, 1, 2, 3], 5) == (5, "")
    assert phase_k([0, 5, 10, 15], 10) == (2, "")  # every 5 steps: k = 10 steps is 2 intervals
    assert phase_k([0, 2, 4, 6], 5) == (5, "ckpt")  # 5 steps is no whole number of intervals
    assert phase_k([0, 3, 4, 9], 5) == (5, "ckpt")
    path = planted(range(2, 81, 2))  # every 2 steps, turn at 20
    pm = phase_metrics(path)
    assert set(pm["local_cos"]["all"]) == {"local_cos_k5ckpt", "local_cos_k10", "local_cos_k15ckpt"}
    assert pm["steps"]["lora_local_cos_step_k10"] == TURN  # 5 intervals of 2 steps
    assert pm["steps"]["lora_local_cos_step_k5ckpt"] == TURN


def _write_adapter(folder, factors):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    rank = next(iter(factors.values())).a.shape[0]
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 2 * rank}))
    tensors = {}
    for n, f in factors.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = f.a.astype(np.float32)
        tensors[f"base_model.model.{n}.lora_B.weight"] = f.b.astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))


def test_trajectory_logs_the_phase_metrics_beside_the_transition_step(tmp_path):
    path = planted(range(1, 41))
    adapters = {}
    for s, f in path.items():
        _write_adapter(tmp_path / str(s), f)
        adapters[s] = tmp_path / str(s)
    t = trajectory(adapters)
    assert t.phase_steps["lora_local_cos_step_k5"] == TURN and t.phase_steps["lora_composition_step"] == TURN
    metrics = t.metrics_by_step()
    want = direct_local_cos(path, 5)
    assert metrics[TURN]["lora/all/local_cos_k5"] == pytest.approx(want[TURN], abs=1e-5)
    assert metrics[30]["lora/all/local_cos_k10"] == pytest.approx(want_k10 := direct_local_cos(path, 10)[30], abs=1e-5)
    assert want_k10 < -0.5
    layer0 = direct_local_cos(path, 5, ["model.layers.0.mlp.down_proj"])[TURN]
    assert metrics[TURN]["lora/layer00/local_cos_k5"] == pytest.approx(layer0, abs=1e-5)
    assert metrics[10]["lora/all/composition"] == pytest.approx(direct_composition(path)[10], abs=1e-5)
    layer1 = direct_local_cos(path, 5, ["model.layers.1.mlp.down_proj"])[TURN]
    assert t.modules[TURN]["model.layers.1.mlp.down_proj"]["local_cos_k5"] == pytest.approx(layer1, abs=1e-5)


def test_signals_figure_draws_the_phase_metrics_and_their_steps(tmp_path):
    from em_core.analysis.plots import plot_signals_vs_step
    from em_core.analysis.probe import ProbeResult, result_steps

    path = planted(range(1, 41))
    adapters = {}
    for s, f in path.items():
        _write_adapter(tmp_path / str(s), f)
        adapters[s] = tmp_path / str(s)
    t = trajectory(adapters)
    metrics = t.metrics_by_step()
    steps = result_steps(ProbeResult(None, "m", t.steps, metrics, None, t.transition_step, None, t.phase_steps))
    assert steps[TURN] == {"lora_local_cos_step_k5": TURN, "lora_local_cos_step_k10": TURN,
                           "lora_local_cos_step_k15": TURN, "lora_composition_step": TURN,
                           "lora_transition_step": TURN}  # em-lab's own turn rule agrees
    for s, m in steps.items():
        metrics.setdefault(s, {}).update(m)
    png = plot_signals_vs_step(metrics, tmp_path / "s.png")
    drawn = json.loads(png.with_suffix(".json").read_text())
    for key in ("lora/all/local_cos_k5", "lora/all/local_cos_k15", "lora/all/composition"):
        want = [(s, metrics[s][key]) for s in sorted(metrics) if key in metrics[s]]
        assert [p[0] for p in drawn["curves"][key]] == [s for s, _ in want]
        assert [p[1] for p in drawn["curves"][key]] == pytest.approx([v for _, v in want])
    assert drawn["marks"]["lora_local_cos_step_k10"] == [TURN] and drawn["marks"]["lora_composition_step"] == [TURN]
