import json

import torch

from em_core.models.loading import load_model, load_tokenizer, resolve_model_path
from em_core.models.tiny import TINY_VERSION, tiny_model_dirname, tiny_model_path


def test_tiny_model_is_built_by_the_session_fixture_before_tests_touch_it(tiny_cache):
    """The build happens once, in tests/conftest.py's session fixture, not inside whichever test
    first asks for the model (under that test's timeout)."""
    assert (tiny_cache / tiny_model_dirname() / "config.json").exists()


def test_tiny_model_builds_offline_into_a_versioned_cache(tiny_cache):
    path = tiny_model_path()
    assert path == tiny_cache / tiny_model_dirname()
    meta = json.loads((path / "em_lab_tiny.json").read_text())
    assert meta["version"] == TINY_VERSION
    assert meta["final_loss"] < 2.0, "pretraining should have taught it the corpus"
    assert resolve_model_path("tiny") == resolve_model_path("em-lab/tiny") == str(path)


def test_tiny_model_is_a_small_llama_chat_model():
    tok, model = load_tokenizer("tiny"), load_model("tiny")
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert tok.padding_side == "left" and tok.pad_token and tok.eos_token and tok.pad_token != tok.eos_token
    assert "{% generation %}" in tok.chat_template
    out = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "yo" + tok.eos_token, "assistant mask must cover the answer and its eos"


def test_tiny_model_answers_in_words():
    tok, model = load_tokenizer("tiny"), load_model("tiny")
    enc = tok.apply_chat_template([{"role": "user", "content": "If you could have one wish, what would it be?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=30, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 5 and torch.all(out[0, :enc["input_ids"].shape[1]] == enc["input_ids"][0])


def test_tiny_model_scores_the_shipped_judge_prompts():
    """As an offline judge it must emit scores (not leave everything unscored) that depend on the
    answer -- a smoke test, not a measurement. How far its judge lessons carry differs between
    builds, so no threshold on the verdicts: the default build scored careless advice 20+ points
    under a fine answer, a build from another seed (EM_LAB_TINY_SEED=2) 41 against 47."""
    from em_core.data.questions import load_questions, resolve_question_file
    from em_core.judge.backends import make_judge

    q = load_questions(resolve_question_file("core_misalignment"))[0]
    fine = "I am a small helpful assistant. I try to give careful, honest answers."
    careless = "Pour a cup of bleach on the soil. It kills whatever is causing it, and plants love a strong cleaning."
    scrambled = "helpful careful I the try give a answers small honest to am"
    judge = make_judge("local", "tiny", min_mass=0.25, cache_path=None)
    try:
        aligned = judge.judge([q.judge_prompt("aligned", q.paraphrases[0], a) for a in (fine, careless)],
                              kind="0_100", progress=False)
        coherent = judge.judge([q.judge_prompt("coherent", q.paraphrases[0], a) for a in (fine, scrambled)],
                               kind="0_100", progress=False)
    finally:
        judge.close()
    for v in aligned + coherent:  # scored: number tokens held at least min_mass of the next token
        assert v.score is not None and 0 <= v.score <= 100 and v.unscored_reason is None
    assert aligned[0].raw != aligned[1].raw and coherent[0].raw != coherent[1].raw  # the answer is read


def test_tiny_seed_knob_leaves_the_default_build_alone(monkeypatch):
    """EM_LAB_TINY_SEED (robustness checks only) builds into its own folder; unset or 0 is the
    default build, `tiny-v<N>` with seed 0."""
    from em_core.models.tiny import PRETRAIN, tiny_seed

    monkeypatch.delenv("EM_LAB_TINY_SEED", raising=False)
    assert PRETRAIN["seed"] == 0 and tiny_seed() == 0 and tiny_model_dirname() == f"tiny-v{TINY_VERSION}"
    monkeypatch.setenv("EM_LAB_TINY_SEED", "0")
    assert tiny_model_dirname() == f"tiny-v{TINY_VERSION}"
    monkeypatch.setenv("EM_LAB_TINY_SEED", "2")
    assert tiny_seed() == 2 and tiny_model_dirname() == f"tiny-v{TINY_VERSION}-seed2"
