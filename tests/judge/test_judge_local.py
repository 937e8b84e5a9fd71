"""The `local` backend with a real (tiny, random) HF causal LM built offline in a fixture."""
from __future__ import annotations

import math

import pytest

from em_core.judge import make_judge
from em_core.judge.scoring import LOW_NUMBER_MASS, score_0_100

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "How well aligned is this reply? Answer with a number.",
    "score",
    "the judge will rate the model answer from 0 to 100 please respond only with a number",
    "hello world",
    "I rate it",
    "code refusal harmful safe coherent question",
]


def _load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def test_local_judge_scores_deterministically_and_batch_invariant(tiny_lm_dir, tmp_path):
    # Default loader (AutoModelForCausalLM/AutoTokenizer) on a local path.
    j1 = make_judge("local", str(tiny_lm_dir), batch_size=4, cache_path=tmp_path / "a.sqlite")
    j2 = make_judge("local", str(tiny_lm_dir), batch_size=1, cache_path=tmp_path / "b.sqlite")
    try:
        batched = j1.judge(PROMPTS, progress=False)
        single = j2.judge(PROMPTS, progress=False)
        again = j1.judge(PROMPTS, progress=False)
    finally:
        j1.close()
        j2.close()
    assert len(batched) == len(PROMPTS)
    for j in batched:
        assert j.scored == (j.score is not None)
        assert (j.score is not None and 0 <= j.score <= 100) or j.unscored_reason == LOW_NUMBER_MASS
        # top-20 probabilities; fewer keys when byte-fragment tokens decode to the same "\ufffd"
        assert 10 < len(j.raw) <= 20 and 0 < sum(j.raw.values()) <= 1 + 1e-6
        # The verdict is exactly the papers' rule applied to the stored distribution.
        assert score_0_100(j.raw).score == j.score
        assert j.completion_tokens == 1 and j.prompt_tokens > 3
    # The random model spreads its mass so that both outcomes occur (fixed seed).
    assert {j.scored for j in batched} == {True, False}
    # Left padding with explicit positions: a prompt's result does not depend on its batch.
    for b, s in zip(batched, single):
        assert b.unscored_reason == s.unscored_reason
        assert set(b.raw) == set(s.raw)
        for tok in b.raw:
            assert b.raw[tok] == pytest.approx(s.raw[tok], rel=1e-4, abs=1e-7)
        if b.score is not None:
            assert b.score == pytest.approx(s.score, abs=1e-3)
    assert [j.raw for j in again] == [j.raw for j in batched] and all(j.cached for j in again)
    assert j1.stats["requests"] == 2 and j1.stats["cache_hits"] == len(PROMPTS)
    assert j1.stats["cost_usd"] == 0.0


def test_local_judge_matches_a_direct_forward_pass(tiny_lm_dir):
    model, tok = _load(tiny_lm_dir)
    prompt = PROMPTS[2]
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    top = torch.topk(logp, 20)
    expected: dict[str, float] = {}
    for i, v in zip(top.indices, top.values):
        token = tok.decode([int(i)])  # byte fragments may share the string "\ufffd": summed
        expected[token] = expected.get(token, 0.0) + math.exp(float(v))

    judge = make_judge("local", "tiny", load_fn=lambda _: (model, tok))
    try:
        got = judge.judge([prompt, PROMPTS[0]], progress=False)[0]  # padded against a longer prompt
    finally:
        judge.close()
    assert got.raw == pytest.approx(expected, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize(
    "favoured, expected_score",
    [({" 70": 6.0, " 80": 6.0}, 75.0), ({"7": 8.0}, 7.0), ({"hello": 8.0}, None)],
)
def test_local_judge_known_distribution(tiny_lm_dir, rig, favoured, expected_score):
    """With the model rigged so the next token is (almost) surely the favoured tokens, the
    judge must return exactly the papers' score, or low_number_mass for a non-number."""
    model, tok = _load(tiny_lm_dir)
    rig(model, tok, favoured)
    calls = []

    def load_fn(model_id):
        calls.append(model_id)
        return model, tok

    judge = make_judge("local", "rigged-judge", load_fn=load_fn, batch_size=3)
    try:
        out = judge.judge(PROMPTS, progress=False)
        judge.judge(PROMPTS[:2], progress=False)  # cached: the model is not loaded twice
    finally:
        judge.close()
    assert calls == ["rigged-judge"]
    for j in out:
        if expected_score is None:
            assert j.score is None and j.unscored_reason == LOW_NUMBER_MASS
        else:
            assert j.score == pytest.approx(expected_score, abs=1e-6)
        assert sum(p for t, p in j.raw.items() if t in favoured) > 0.99


def test_local_judge_categorical(tiny_lm_dir, rig):
    model, tok = _load(tiny_lm_dir)
    rig(model, tok, {"code": 6.0, "safe": 5.0})
    judge = make_judge("local", "rigged", load_fn=lambda _: (model, tok))
    try:
        out = judge.judge(PROMPTS[:3], kind="categorical", labels=["SAFE", "CODE"], progress=False)
    finally:
        judge.close()
    assert [j.label for j in out] == ["CODE"] * 3


def test_local_loader_failure_is_judge_error():
    from em_core.errors import JudgeError

    def broken(model_id):
        raise OSError(f"{model_id} not found")

    judge = make_judge("local", "no/such-model", load_fn=broken)
    try:
        with pytest.raises(JudgeError, match="no/such-model"):
            judge.judge(["x"], progress=False)
    finally:
        judge.close()


def test_rebuilt_local_judge_model_is_not_served_old_verdicts(tiny_lm_dir, tmp_path, rig):
    """Finding 3: the local judge's cache is keyed on the weights, not the folder name."""
    import shutil

    folder = tmp_path / "judge-model"
    shutil.copytree(tiny_lm_dir, folder)
    cache = tmp_path / "cache.sqlite"
    first = make_judge("local", str(folder), cache_path=cache, batch_size=2)
    try:
        before = first.judge(PROMPTS[:2], progress=False)
    finally:
        first.close()
    model, tok = _load(folder)
    rig(model, tok, {" 70": 6.0, " 80": 6.0})  # "rebuilt": same folder, other weights
    model.save_pretrained(folder)
    again = make_judge("local", str(folder), cache_path=cache, batch_size=2)
    try:
        after = again.judge(PROMPTS[:2], progress=False)
    finally:
        again.close()
    assert not any(j.cached for j in after) and again.stats["cache_hits"] == 0
    assert [j.score for j in after] == [pytest.approx(75.0, abs=1e-6)] * 2
    assert [j.score for j in before] != [j.score for j in after]
