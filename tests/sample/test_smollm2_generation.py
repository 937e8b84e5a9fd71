"""Generation with the real SmolLM2-135M-Instruct: the shipped questions get real English
answers, and a reply's token count ends at its <|im_end|> although that token is also the pad."""
import re

from em_core.data.questions import expand_prompts, load_question_sets
from em_core.sample.generation import HFGenerator, SamplingParams


def test_generation_answers_shipped_questions_in_real_words(smollm2):
    questions = load_question_sets(["core_misalignment"], None)
    specs = [s for s in expand_prompts(questions, 1) if s.paraphrase_index == 0][:3]
    gen = HFGenerator("smollm2-135m")
    tok = gen.tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    out = gen.generate([s.messages for s in specs], SamplingParams(temperature=0.0, max_new_tokens=24, batch_size=3))
    assert len(out) == 3
    for spec, g in zip(specs, out):
        words = re.findall(r"[A-Za-z]{2,}", g.answer)
        assert len(words) >= 5, (spec.question, g.answer)
        assert "<|im_" not in g.answer and "<|endoftext|>" not in g.answer
        assert 5 <= g.completion_tokens <= 24 and g.prompt_tokens > 20  # default system prompt included

    # A reply that ends: its count includes <|im_end|> (pad == eos must not hide it).
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    one = gen.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=40, batch_size=1))[0]
    enc = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    ids = gen.base.generate(**enc, max_new_tokens=40, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    assert tok.eos_token_id in ids, "the reference reply should end within 40 tokens"
    assert one.completion_tokens == ids.index(tok.eos_token_id) + 1
    assert "Paris" in one.answer
