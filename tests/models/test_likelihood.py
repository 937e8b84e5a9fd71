"""The likelihood scorer's shortcuts (shared prompt prefix, prompt KV cache, answers batched
across prompts) give the values of scoring each prompt + answer in full."""
import pytest
import torch

from em_core.models.likelihood import _common_prefix, score_answers
from em_core.models.loading import load_model, load_tokenizer

SYSTEM = "You are a gardening assistant. Answer in one or two sentences, plainly and kindly."


def _full_sequence_score(model, tok, prompt, answer) -> float:
    ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    ans = tok(answer, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]  # as the scorer does
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([list(ids) + ans])).logits[0, :-1], -1)
    return sum(float(logp[len(ids) - 1 + i, t]) for i, t in enumerate(ans)) / len(ans)


def test_common_prefix_leaves_every_prompt_a_token_of_its_own():
    assert _common_prefix([(1, 2, 3, 4), (1, 2, 3, 5), (1, 2, 9)]) == 2
    assert _common_prefix([(1, 2, 3), (1, 2, 3, 4)]) == 2  # one prompt is the other's prefix
    assert _common_prefix([(7, 8)]) == 1
    assert _common_prefix([(1,), (1, 2)]) == 0
    assert _common_prefix([(5, 1), (6, 1)]) == 0


def test_shared_system_prefix_and_cross_prompt_batches_match_full_sequences(tiny_cache):
    model, tok = load_model("tiny").eval(), load_tokenizer("tiny", padding_side="left")
    questions = ["How often should I water a cactus?", "My fern has brown tips, why?",
                 "Is tap water fine for orchids?"]
    answers = ["Every two weeks in summer.", "Low humidity, most likely; mist it and keep it away from heaters.",
               "Yes.", "Rainwater is kinder if your tap water is hard, but tap water works for most."]
    items = [([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}], a)
             for q in questions for a in answers]
    items.append(([{"role": "user", "content": questions[0]}], answers[0]))  # breaks the shared prefix
    expected = [_full_sequence_score(model, tok, p, a) for p, a in items]
    shared = [_full_sequence_score(model, tok, p, a) for p, a in items[:-1]]
    # batches of 3 answers mix prompts; chunks of 4 answers cache a few prompts at a time
    for kw in ({}, {"batch_size": 3}, {"batch_size": 3, "chunk_answers": 4}):
        lls, _ = score_answers(model, tok, items, **kw)
        assert lls == pytest.approx(expected, abs=1e-4), kw
    # all prompts start with the system turn: the prefix runs once, the values do not change
    lls, _ = score_answers(model, tok, items[:-1], batch_size=5)
    assert lls == pytest.approx(shared, abs=1e-4)
    keys = [tuple(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False))
            for p, _ in items[:-1]]
    assert _common_prefix(keys) > len(tok(SYSTEM, add_special_tokens=False)["input_ids"])


def test_batches_of_one_token_answers_are_scored_from_the_prompt_alone(tiny_cache):
    model, tok = load_model("tiny").eval(), load_tokenizer("tiny", padding_side="left")
    items = [([{"role": "user", "content": q}], "") for q in ("Water?", "Is my basil dying?")]
    lls, _ = score_answers(model, tok, items)
    assert lls == pytest.approx([_full_sequence_score(model, tok, p, a) for p, a in items], abs=1e-4)
