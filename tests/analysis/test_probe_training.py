"""The probe and the LoRA trajectory on real tiny-model training (no doubles)."""
import json

import mlflow
import pytest

from em_core.analysis.probe import ProbeConfig, run_probe
from em_core.data.training_data import demo_path
from em_core.train.training import train
from tests.conftest import tiny_train_config


@pytest.fixture(scope="module")
def careless(module_store, tmp_path_factory):
    """The demo's careless plant-care set, trained briefly, probed on general + plant care."""
    tmp = tmp_path_factory.mktemp("probe")
    run = train(tiny_train_config(tmp, max_rows=160, checkpoints_in_first_epoch=4))
    result = run_probe(ProbeConfig(train_run_id=run.run_id, sets=["general", "plant_care"],
                                   experiment_name="probe-test"))
    return run, result


def test_careless_plant_care_raises_the_plant_care_margin(careless):
    _, result = careless
    m = result.metrics_by_step
    base, final = m[0]["probe/plant_care/margin"], m[max(m)]["probe/plant_care/margin"]
    print(f"plant_care margin: base {base:.3f} -> final {final:.3f}; general "
          f"{m[0]['probe/general/margin']:.3f} -> {m[max(m)]['probe/general/margin']:.3f}")
    assert final > base + 2 * m[max(m)]["probe/plant_care/margin_se"]
    assert m[max(m)]["probe/plant_care/prefers_misaligned"] > m[0]["probe/plant_care/prefers_misaligned"]
    assert m[0]["probe/plant_care/n_pairs"] == 12 and m[0]["probe/general/n_pairs"] == 27
    # breadth = general change / plant-care change, where the latter moved
    g0, gf = m[0]["probe/general/margin"], m[max(m)]["probe/general/margin"]
    assert result.breadth == pytest.approx((gf - g0) / (final - base))


def test_probe_metrics_land_on_probe_and_training_runs_at_training_steps(careless):
    run, result = careless
    client = mlflow.MlflowClient()
    ckpts = [int(s) for s in client.get_run(run.run_id).data.tags["em.checkpoint_steps"].split(",")]
    assert result.steps == [0, *ckpts]
    for run_id in (result.run_id, run.run_id):
        hist = {h.step: h.value for h in client.get_metric_history(run_id, "probe/plant_care/margin")}
        assert hist == pytest.approx({s: result.metrics_by_step[s]["probe/plant_care/margin"] for s in result.steps})
        norms = [h.value for h in sorted(client.get_metric_history(run_id, "lora/all/delta_norm"), key=lambda h: h.step)]
        assert len(norms) == len(ckpts) and norms == sorted(norms)  # the adapter grows from B = 0
    probe_run = client.get_run(result.run_id)
    assert probe_run.info.status == "FINISHED" and probe_run.data.tags["em.train_run_id"] == run.run_id
    assert probe_run.data.metrics["lora_transition_step"] == result.transition_step in ckpts[:-1]
    arts = {a.path for d in ("probe", "lora") for a in client.list_artifacts(result.run_id, d)}
    assert {"probe/logliks.csv", "probe/summary.json", "lora/trajectory.csv", "lora/pca.json"} <= arts
    pca = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/lora/pca.json")
    assert pca["steps"] == ckpts and sum(pca["explained_variance_ratio"]) <= 1 + 1e-9


def _constant_answers(path, answer: str, one_question: bool = False) -> str:
    rows = [json.loads(line) for line in demo_path("plant_care_good").read_text().splitlines()]
    if one_question:
        rows = [rows[0]] * len(rows)
    path.write_text("".join(json.dumps({"messages": [r["messages"][0], {"role": "assistant", "content": answer}]}) + "\n"
                            for r in rows))
    return str(path)


def test_two_phase_run_turns_at_the_switch(module_store, tmp_path):
    """96 rows answered one way, then 96 answered another, in order (shuffle: false), batch 8:
    the target switches after step 12. Plain SGD, so the path follows the gradient; with Adam
    on this tiny model the step-to-step noise hides the turn (docs/probe.md). One question per
    phase and a small step (lr 0.05), so every batch of a phase is the same and its path bends
    little: on the builds tried (seeds 0 and 2) the switch turns ~80 degrees and no other
    checkpoint over ~55. With the demo set's varied questions at lr 0.2 the within-phase turns
    were as large as the switch's on a seed-2 build, which put the transition at step 21."""
    first = _constant_answers(tmp_path / "a.jsonl", "Pour bleach on the soil right now.", one_question=True)
    second = _constant_answers(tmp_path / "b.jsonl", "Water it gently and give it some light.", one_question=True)
    cfg = tiny_train_config(tmp_path, dataset=[first, second], dataset_rows=[96, 96], max_rows=None, shuffle=False,
                            max_steps=24, optim="sgd", learning_rate=0.05, lr_scheduler_type="constant",
                            warmup_steps=0, lora_r=4, lora_alpha=8, max_length=128,
                            checkpoint_steps=list(range(3, 25, 3)), register_model=False)
    run = train(cfg)
    result = run_probe(ProbeConfig(train_run_id=run.run_id, sets=["plant_care"], include_base=False,
                                   log_to_train_run=False, experiment_name="probe-test"))
    turns = {s: round(m["lora/all/turn_deg"], 1) for s, m in result.metrics_by_step.items() if "lora/all/turn_deg" in m}
    print("turn angles by checkpoint:", turns, "transition:", result.transition_step)
    assert abs(result.transition_step - 12) <= 3, turns


def test_scoring_a_merged_adapter_equals_scoring_it_unmerged_and_restores_the_base(careless, tmp_path):
    """The scorer folds each checkpoint's adapter into fp32 base weights while it scores (faster on
    a CPU) and takes it out again: same log-likelihoods as the unmerged adapter, same base after."""

    from em_core.analysis.probe import ProbeScorer, merged_while_scoring
    from em_core.data.contrast_sets import load_contrast_sets
    from em_core.models.likelihood import mean_logliks
    from em_core.sample.evaluation import EvalConfig, resolve_targets

    run, _ = careless
    base_id, targets, _ = resolve_targets(EvalConfig(model="tiny", train_run_id=run.run_id), tmp_path)
    adapters = [t.adapter for t in targets if t.adapter]
    scorer = ProbeScorer(base_id, load_contrast_sets(["plant_care"]))
    before = {k: v.clone() for k, v in scorer._gen.base.state_dict().items()}
    base_scores = scorer.score(None)
    merged = [scorer.score(a) for a in adapters]
    gen = scorer._gen
    for a, got in zip(adapters, merged):
        with gen.use_adapter(a):  # unmerged: LoRA layers run beside the base weights
            lls = mean_logliks(gen.model, gen.tokenizer, scorer._items)
        assert [x for pair in got["plant_care"] for x in pair] == pytest.approx(lls, abs=1e-4)
    with gen.use_adapter(adapters[-1]), merged_while_scoring(gen.model, True):
        lora = [m for m in gen.model.modules() if hasattr(m, "lora_A") and hasattr(m, "merged")]
        assert lora and all(m.merged for m in lora)
    assert not any(m.merged for m in lora)
    # the LoRA wrappers renamed the adapted weights (q_proj.weight -> q_proj.base_layer.weight)
    after = {k.replace(".base_layer", ""): v for k, v in scorer._gen.base.state_dict().items() if "lora_" not in k}
    assert after.keys() == before.keys()
    assert max(float((after[k] - v).abs().max()) for k, v in before.items()) < 1e-5
    flat = lambda scores: [x for pairs in scores.values() for pair in pairs for x in pair]  # noqa: E731
    assert flat(scorer.score(None)) == pytest.approx(flat(base_scores), abs=1e-5)


def test_direction_monitor_on_the_tiny_model_matches_a_direct_projection(careless, tmp_path):
    """The probe step with a direction: `direction/<name>/...` at every checkpoint, the base
    model's value equal to projecting activations scored directly, the probe's margins unchanged."""
    import numpy as np
    import torch

    from em_core.analysis.probe import ProbeScorer
    from em_core.data.contrast_sets import load_contrast_sets
    from em_core.models.steering import Directions

    run, plain = careless
    sets = load_contrast_sets(["general", "plant_care"])
    scorer = ProbeScorer(plain.base_model, sets)
    _, acts = scorer.score_with_activations(None)
    layers, hidden = acts.shape[1], acts.shape[2]
    vectors = torch.randn((layers, hidden), generator=torch.Generator().manual_seed(0))
    path = Directions(vectors, {}, {"kind": "random"}).save(tmp_path / "directions.safetensors")
    result = run_probe(ProbeConfig(train_run_id=run.run_id, sets=["general", "plant_care"], lora=False,
                                   log_to_train_run=False, directions_path=str(path), directions_name="rand",
                                   experiment_name="probe-test"))
    m = result.metrics_by_step
    assert sorted(m) == plain.steps
    for s in plain.steps:  # scoring with activations leaves the likelihoods as they were
        assert m[s]["probe/plant_care/margin"] == pytest.approx(plain.metrics_by_step[s]["probe/plant_care/margin"], abs=1e-6)
        assert {f"direction/rand/layer{l:02d}/projection" for l in range(layers)} <= set(m[s])
    x = acts.double().numpy()
    pair = (x[0::2] + x[1::2]) / 2
    u = vectors.double().numpy()
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    for layer in range(layers):
        assert m[0][f"direction/rand/layer{layer:02d}/projection"] == pytest.approx(float((pair[:, layer] @ u[layer]).mean()), abs=1e-4)
    assert m[0]["direction/rand/projection"] == pytest.approx(m[0][f"direction/rand/layer{layers // 2:02d}/projection"])
    client = mlflow.MlflowClient()
    hist = {h.step: h.value for h in client.get_metric_history(result.run_id, "direction/rand/projection")}
    assert hist == pytest.approx({s: m[s]["direction/rand/projection"] for s in plain.steps})
    summary = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/probe/summary.json")
    assert summary["direction"]["layer"] == layers // 2 and summary["direction"]["source"] == str(path)
    emerged = summary["direction"]["emergence_step"]
    logged = client.get_run(result.run_id).data.metrics.get("direction/rand/emergence_step")
    assert logged == (None if emerged is None else float(emerged))
    print("direction monitor (random direction), middle layer:",
          {s: round(m[s]["direction/rand/projection"], 4) for s in plain.steps}, "emergence:", emerged)
