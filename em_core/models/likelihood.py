"""How likely a model finds given answers: the one forward-pass scorer behind the likelihood
probe (analysis/probe.py) and the directions' extraction and margins (analysis/directions.py).

Each item is a chat prompt (system/user turns) and an answer; the score is the answer's mean
per-token log-likelihood given the chat-formatted prompt, answer tokens only and no end-of-turn
token, so answers of any length compare fairly. With `activations`, the mean residual stream
over the answer tokens after every decoder layer comes back too. It runs under whatever hooks
are on the model, so steering and ablation apply to both.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

from em_core.models.steering import decoder_layers, hooked


def encode_item(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], int]:
    """Token ids of chat prompt + answer, and the number of prompt tokens (an empty answer is
    scored as the end-of-sequence token, so every item has at least one scored token)."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        answer_ids = [tokenizer.eos_token_id]
    return list(prompt_ids) + list(answer_ids), len(prompt_ids)


def truncate(seq: list[int], n_prompt: int, max_length: int) -> tuple[list[int], int]:
    """Prompt + answer cut to `max_length` tokens so that what is scored is always answer tokens:
    a prompt that leaves room keeps whole and the answer loses its tail; a prompt that does not
    (>= max_length tokens) loses its head instead, keeping its last tokens (the ones nearest the
    answer) and leaving the answer its first max(1, max_length // 2) tokens or all of it if
    shorter. Returns (ids, number of prompt ids)."""
    if max_length < 2:
        raise ValueError(f"max_length {max_length}: need at least 2 tokens (one prompt, one answer)")
    if len(seq) <= max_length:
        return seq, n_prompt
    if n_prompt < max_length:
        return seq[:max_length], n_prompt
    answer = seq[n_prompt:][:max(1, max_length // 2)]
    keep = max_length - len(answer)
    return seq[n_prompt - keep:n_prompt] + answer, keep


def _common_prefix(keys: Sequence[tuple[int, ...]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own (its last position
    predicts its answer's first token)."""
    n = min(len(k) for k in keys) - 1
    first = keys[0]
    for k in keys[1:]:
        n = next((j for j in range(n) if k[j] != first[j]), n)
    return max(n, 0)


def _prompt_caches(model, keys: Sequence[tuple[int, ...]], pad: int, device, batch_size: int):
    """KV cache of every prompt in `keys`, one row each, its attention mask, and the
    log-probabilities of the token after it (row i = keys[i]).

    Row layout: the prefix all the prompts share, left padding, the rest of the prompt. The shared
    prefix (a chat template's system turn, often half of a short prompt) runs once and every
    row attends to it; all rows have one width so answers of any prompt can share a batch."""
    import torch
    from transformers import DynamicCache

    shared = _common_prefix(keys)
    prefix = None
    if shared:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([keys[0][:shared]], device=device), use_cache=True, logits_to_keep=1)
        prefix = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    width = max(len(k) for k in keys) - shared
    kv_parts, masks, firsts = [], [], []
    for s in range(0, len(keys), batch_size):
        part = keys[s:s + batch_size]
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for row, key in enumerate(part):
            own = key[shared:]
            ids[row, width - len(own):] = torch.tensor(own)
            mask[row, shared + width - len(own):] = 1
        ids, mask = ids.to(device), mask.to(device)
        cache = None
        if prefix:
            cache = DynamicCache(ddp_cache_data=[(k.expand(len(part), -1, -1, -1), v.expand(len(part), -1, -1, -1))
                                                 for k, v in prefix], config=model.config)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, shared:],
                        past_key_values=cache, use_cache=True, logits_to_keep=1)
        firsts.append(torch.log_softmax(out.logits[:, -1].float(), dim=-1))
        kv_parts.append([(layer.keys, layer.values) for layer in out.past_key_values.layers])
        masks.append(mask)
    kv = [(torch.cat([p[j][0] for p in kv_parts]), torch.cat([p[j][1] for p in kv_parts]))
          for j in range(len(kv_parts[0]))]
    return kv, torch.cat(masks), torch.cat(firsts)


def score_answers(model, tokenizer, items: Sequence[tuple[list[dict], str]], *, batch_size: int = 16,
                  activations: bool = False, max_length: int | None = None, chunk_answers: int = 512):
    """(mean per-token log-likelihood per item, activations [n, layers, hidden] or None), in the
    order of `items`; `max_length` truncates prompt + answer (`truncate`: never into the answer's
    place, so an answer token is always what is scored).

    Items share prompts (a question's aligned and misaligned answers, a question's samples), and
    chat prompts are often longer than the answers, so each distinct prompt runs once, the prefix
    all prompts share once (_prompt_caches), and only the answers run on top of the cache, in
    batches of similar length across prompts: a fraction of the positions of scoring every
    prompt + answer in full (README, Benchmarks), with the same values to float error. Prompts
    are cached `chunk_answers` answers' worth at a time, which bounds the cache's memory."""
    import torch
    from transformers import DynamicCache

    n_layers = len(decoder_layers(model)) if activations else 0
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> the items that ask it
    answers: list[list[int]] = []
    for i, (p, a) in enumerate(items):
        seq, n = encode_item(tokenizer, p, a)
        if max_length:
            seq, n = truncate(seq, n, max_length)
        prompts.setdefault(tuple(seq[:n]), []).append(i)
        answers.append(seq[n:])
    lls: list[float] = [float("nan")] * len(items)
    acts = None
    # Chunks of whole prompts of similar length (longest first), up to `chunk_answers` answers each.
    chunks: list[list[tuple[int, ...]]] = [[]]
    count = 0
    for key in sorted(prompts, key=lambda k: -len(k)):
        if chunks[-1] and count + len(prompts[key]) > max(chunk_answers, batch_size):
            chunks.append([])
            count = 0
        chunks[-1].append(key)
        count += len(prompts[key])
    for chunk in chunks:
        kv, p_mask, first = _prompt_caches(model, chunk, pad, device, batch_size)
        members = sorted(((row, i) for row, key in enumerate(chunk) for i in prompts[key]),
                         key=lambda m: -len(answers[m[1]]))  # less padding in the answer batches
        for s in range(0, len(members), batch_size):
            part = members[s:s + batch_size]
            rows = torch.tensor([row for row, _ in part], device=device)
            wa = max(len(answers[i]) for _, i in part)
            a_ids = torch.full((len(part), wa), pad, dtype=torch.long)
            a_mask = torch.zeros_like(a_ids)
            for r, (_, i) in enumerate(part):
                a_ids[r, :len(answers[i])] = torch.tensor(answers[i])
                a_mask[r, :len(answers[i])] = 1
            a_ids, a_mask = a_ids.to(device), a_mask.to(device)
            cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in kv], config=model.config)
            positions = p_mask[rows].sum(-1, keepdim=True) + torch.arange(wa, device=device)
            captured: dict[int, torch.Tensor] = {}

            def capture(layer, a_mask=a_mask, captured=captured):
                def fn(h):  # returns None: the hidden state passes through unchanged
                    m = a_mask.unsqueeze(-1).to(h.dtype)
                    captured[layer] = ((h * m).sum(1) / m.sum(1)).float().cpu()
                return fn

            hooks = hooked(model, {l: capture(l) for l in range(n_layers)}) if activations else contextlib.nullcontext()
            # answer token 0 is predicted from the prompt's last position, token j from answer
            # position j - 1: the last answer position predicts nothing, so it gets no logits
            keep = torch.arange(max(wa - 1, 1), device=device)
            with torch.no_grad(), hooks:
                logits = model(input_ids=a_ids, attention_mask=torch.cat([p_mask[rows], a_mask], dim=1),
                               position_ids=positions, past_key_values=cache, use_cache=True,
                               logits_to_keep=keep).logits.float()[:, :wa - 1]
            lp0 = first[rows].gather(-1, a_ids[:, :1]).squeeze(-1)
            # log-softmax at the answer tokens only: logit - logsumexp, no vocab-sized output
            rest = logits.gather(-1, a_ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
            per = ((lp0 + (rest * a_mask[:, 1:]).sum(1)) / a_mask.sum(1)).cpu()
            for r, (_, i) in enumerate(part):
                lls[i] = float(per[r])
            if activations:
                batch = torch.stack([captured[l] for l in range(n_layers)], dim=1)
                if acts is None:
                    acts = torch.zeros((len(items), *batch.shape[1:]), dtype=batch.dtype)
                acts[torch.tensor([i for _, i in part])] = batch
    return lls, acts


def mean_logliks(model, tokenizer, items: Sequence[tuple[list[dict], str]], batch_size: int = 16) -> list[float]:
    """Each answer's mean per-token log-likelihood given its chat-formatted prompt."""
    return score_answers(model, tokenizer, items, batch_size=batch_size)[0]
