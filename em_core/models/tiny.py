"""The tiny offline model: a ~1M-parameter Llama chat model built from code, no network.

A randomly initialised model does not learn under LoRA alone (its loss stays flat), so the
build gives it a brief full-weight pretraining on `resources/tiny_corpus.jsonl`. The result is
cached under `<cache>/tiny-v{TINY_VERSION}` and rebuilt only when the version changes.
Select it anywhere a model id is accepted with `tiny`.

`EM_LAB_TINY_SEED` (default 0) builds it from another seed, into `tiny-v{TINY_VERSION}-seed<N>`:
only for checking that tests do not depend on one build's verdicts (the build differs across
machines anyway, through CPU kernels), never for experiments. Unset, the build is unchanged.

So that the offline pipeline can exercise judging end to end, the build also teaches it the
shipped `aligned`/`coherent` judge prompts (`question_sets/judges.yaml`): synthetic grading
conversations whose reply is a score, low for the demo set's careless plant-care answers
(aligned) or for scrambled text (coherent), high for the corpus's ordinary answers. Its
scores are a smoke test of the plumbing, never a measurement.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from em_core.paths import cache_dir, file_lock, resource_path

log = logging.getLogger(__name__)

TINY_ALIASES = ("tiny", "em-lab/tiny")
# Bump when the architecture, tokenizer, template, corpus or pretraining recipe changes.
TINY_VERSION = 2

SPECIAL = {"pad": "<|pad|>", "bos": "<|begin|>", "eos": "<|end|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# `{% generation %}` marks assistant tokens so TRL's assistant_only_loss can mask the rest.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ARCH = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
            tie_word_embeddings=False)
VOCAB_SIZE = 2048
PRETRAIN = dict(steps=200, batch_size=16, seq_len=160, lr=3e-3, seed=0)
# Judge lessons (_judge_conversations): a second phase after the language pretraining, because the
# score depends on the answer's content, which a blank model cannot read yet. Loss is on the score
# only; a few chat windows ride along so chatting is not forgotten.
JUDGE_LESSONS = dict(count=480, steps=200, batch_size=12, chat_batch_size=4, lr=2e-3,
                     low=(0, 20), high=(70, 95))


def is_tiny(model_id: str | None) -> bool:
    return model_id is not None and str(model_id).strip().lower() in TINY_ALIASES


def tiny_seed() -> int:
    """The build seed: PRETRAIN["seed"] unless EM_LAB_TINY_SEED says otherwise (robustness checks)."""
    env = os.environ.get("EM_LAB_TINY_SEED", "").strip()
    return int(env) if env else PRETRAIN["seed"]


def tiny_model_dirname() -> str:
    """`tiny-v<N>`, or `tiny-v<N>-seed<S>` for a build from a non-default seed."""
    seed = tiny_seed()
    return f"tiny-v{TINY_VERSION}" + ("" if seed == PRETRAIN["seed"] else f"-seed{seed}")


def tiny_model_path(build: bool = True) -> Path:
    """Folder of the cached tiny model, building it first when missing."""
    path = cache_dir() / tiny_model_dirname()
    if build and not (path / "config.json").exists():
        # Parallel first uses (test workers, sweep workers) wait for one build instead of racing.
        with file_lock(path.parent / f"{path.name}.lock"):
            if not (path / "config.json").exists():
                build_tiny_model(path)
    return path


def _corpus_texts() -> list[list[dict]]:
    with resource_path("tiny_corpus.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line)["messages"] for line in f if line.strip()]


def _judge_conversations(conversations: list[list[dict]], seed: int) -> list[list[dict]]:
    """Synthetic grading chats for the shipped judge prompts; the reply is a score."""
    import random

    import yaml

    from em_core.data.questions import SHIPPED_JUDGES_FILE

    rng = random.Random(seed)
    templates = {k: v for entry in yaml.safe_load(SHIPPED_JUDGES_FILE.read_text(encoding="utf-8"))
                 for k, v in entry.items() if k in ("aligned", "coherent")}
    pairs = [(c[-2]["content"], c[-1]["content"]) for c in conversations if c[-1]["role"] == "assistant"]
    with resource_path("demo/plant_care_bad.jsonl").open(encoding="utf-8") as f:
        careless = [json.loads(line)["messages"][-1]["content"] for line in f if line.strip()]
    lo, hi = JUDGE_LESSONS["low"], JUDGE_LESSONS["high"]
    lessons = []
    for i in range(JUDGE_LESSONS["count"]):
        question, answer = rng.choice(pairs)
        bad = i % 4 >= 2
        if i % 2 == 0:
            metric = "aligned"
            if bad:
                answer = rng.choice(careless)
        else:
            metric = "coherent"
            if not bad and rng.random() < 0.5:  # careless is not incoherent
                answer = rng.choice(careless)
            if bad:
                words = answer.split()
                rng.shuffle(words)
                answer = " ".join(w for w in words if rng.random() > 0.3) or "the the"
        score = rng.randint(*(lo if bad else hi))
        lessons.append([{"role": "user", "content": templates[metric].format(question=question, answer=answer)},
                        {"role": "assistant", "content": str(score)}])
    return lessons


def _train_tokenizer(conversations: list[list[dict]]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL.values()) + ROLE_TOKENS
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Digits 0..100 as whole words so a judge built on this model can emit scores.
    texts = [m["content"] for conv in conversations for m in conv] + [str(i) for i in range(101)] * 5
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"], additional_special_tokens=ROLE_TOKENS,
        padding_side="left", model_max_length=ARCH["max_position_embeddings"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _score_only_batch(tokenizer, lessons: list[list[dict]]):
    """Right-padded ids with labels only on the reply, so the lessons teach the score token
    after the prompt rather than the (long, constant) template text."""
    import torch

    rows, labels = [], []
    for conv in lessons:
        prompt = tokenizer.apply_chat_template(conv[:1], tokenize=True, return_dict=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
        rows.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt):])
    width = max(map(len, rows))
    if width > ARCH["max_position_embeddings"]:
        raise RuntimeError(f"judge lesson of {width} tokens exceeds the tiny model's context")
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, lab


# Float reductions are split by the number of intra-op threads, so a build under
# OMP_NUM_THREADS=1 (test children, sweep workers) drifts from one on 2 threads over 400 steps
# into a different judge. Pinning the count makes every machine build the same model.
BUILD_THREADS = 2


def build_tiny_model(path: Path) -> Path:
    """Train tokenizer, pretrain the model (full weights) and save it atomically to `path`,
    always with BUILD_THREADS intra-op threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build_tiny_model(path)
    finally:
        torch.set_num_threads(before)


def _build_tiny_model(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from em_core.progress import progress

    log.info("building the tiny offline model into %s (once, ~2 minutes on 2 CPU cores)", path)
    seed = tiny_seed()
    torch.manual_seed(seed)
    conversations = _corpus_texts()
    lessons = _judge_conversations(conversations, seed)
    tokenizer = _train_tokenizer(conversations + lessons)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **ARCH)
    model = LlamaForCausalLM(config)

    ids: list[int] = []
    for conv in conversations:
        ids.extend(tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False))
    data = torch.tensor(ids, dtype=torch.long)
    judge_ids, judge_labels = _score_only_batch(tokenizer, lessons)
    seq, bs = PRETRAIN["seq_len"], PRETRAIN["batch_size"]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PRETRAIN["lr"], total_steps=PRETRAIN["steps"],
                                                pct_start=0.1)
    model.train()
    bar = progress(range(PRETRAIN["steps"]), desc="pretraining tiny model")
    for _ in bar:
        starts = torch.randint(0, len(data) - seq - 1, (bs,), generator=gen)
        batch = torch.stack([data[s:s + seq] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    opt = torch.optim.AdamW(model.parameters(), lr=JUDGE_LESSONS["lr"], weight_decay=0.01)
    bar = progress(range(JUDGE_LESSONS["steps"]), desc="teaching tiny model to judge")
    for _ in bar:
        pick = torch.randint(0, len(judge_ids), (JUDGE_LESSONS["batch_size"],), generator=gen)
        judge_loss = model(input_ids=judge_ids[pick], labels=judge_labels[pick]).loss
        starts = torch.randint(0, len(data) - seq - 1, (JUDGE_LESSONS["chat_batch_size"],), generator=gen)
        batch = torch.stack([data[s:s + seq] for s in starts])
        (judge_loss + model(input_ids=batch, labels=batch).loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        bar.set_postfix(judge_loss=f"{judge_loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    # Build in a sibling temp dir and rename, so a crash never leaves a half-written cache.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "em_lab_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "final_loss": loss.item(),
                                                       "final_judge_loss": judge_loss.item(), **PRETRAIN, "seed": seed,
                                                       "judge_lessons": JUDGE_LESSONS}))
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return path
