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


def test_a_prompt_longer_than_max_length_still_scores_the_answer(tiny_cache):
    """Before the fix a prompt of >= max_length tokens kept its head and the scorer returned the
    log-probability of the prompt's last kept token as the "answer". Now the prompt loses its
    head, and the answer is scored on the prompt's last tokens."""
    from em_core.models.likelihood import truncate

    model, tok = load_model("tiny").eval(), load_tokenizer("tiny", padding_side="left")
    prompt = [{"role": "system", "content": SYSTEM},
              {"role": "user", "content": "My monstera has yellow leaves and the soil stays wet for a week. " * 3}]
    answer = "Water less often and check the roots."
    ids = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    ans = tok(answer, add_special_tokens=False)["input_ids"]
    max_length = len(ids) - 5  # the prompt alone is longer
    (cut,), _ = score_answers(model, tok, [(prompt, answer)], max_length=max_length)
    kept_answer = ans[:max_length // 2]
    kept_prompt = ids[-(max_length - len(kept_answer)):]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([kept_prompt + kept_answer])).logits[0, :-1], -1)
    expected = sum(float(logp[len(kept_prompt) - 1 + i, t]) for i, t in enumerate(kept_answer)) / len(kept_answer)
    assert cut == pytest.approx(expected, abs=1e-4)
    # what the old rule scored: the prompt's token at max_length - 1, given the tokens before it
    with torch.no_grad():
        head = torch.log_softmax(model(input_ids=torch.tensor([ids[:max_length]])).logits[0, -2], -1)
    assert cut != pytest.approx(float(head[ids[max_length - 1]]), abs=1e-3)
    # the rule itself: the answer keeps max_length // 2 tokens, or all of a short one
    seq, n = truncate(list(range(10)) + [100, 101], 10, 6)
    assert seq == [6, 7, 8, 9, 100, 101] and n == 4
    seq, n = truncate(list(range(10)) + list(range(100, 110)), 10, 6)
    assert seq == [7, 8, 9, 100, 101, 102] and n == 3
    assert truncate([1, 2, 3, 4], 2, 3) == ([1, 2, 3], 2)  # a short prompt keeps whole; the answer's tail goes
    with pytest.raises(ValueError, match="max_length 1"):
        truncate([1, 2], 1, 1)
