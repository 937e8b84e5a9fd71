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


def score_answers(model, tokenizer, items: Sequence[tuple[list[dict], str]], *, batch_size: int = 16,
                  activations: bool = False, max_length: int | None = None):
    """(mean per-token log-likelihood per item, activations [n, layers, hidden] or None), in the
    order of `items`. Batches are formed longest first (less padding) and right-padded, so
    positions are exact without position ids; `max_length` truncates prompt + answer."""
    import torch

    n_layers = len(decoder_layers(model)) if activations else 0
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    enc = [encode_item(tokenizer, p, a) for p, a in items]
    if max_length:
        enc = [(ids[:max_length], min(n, max_length - 1)) for ids, n in enc]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    lls: list[float] = [float("nan")] * len(enc)
    acts = None
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(enc[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        ans = torch.zeros((len(idx), width), dtype=torch.bool)
        for row, i in enumerate(idx):
            seq, n_prompt = enc[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            attn[row, :len(seq)] = 1
            ans[row, n_prompt:len(seq)] = True
        ids, attn, ans = ids.to(device), attn.to(device), ans.to(device)
        captured: dict[int, torch.Tensor] = {}

        def capture(layer, ans=ans, captured=captured):
            def fn(h):  # returns None: the hidden state passes through unchanged
                m = ans.unsqueeze(-1).to(h.dtype)
                captured[layer] = ((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu()
            return fn

        hooks = hooked(model, {l: capture(l) for l in range(n_layers)}) if activations else contextlib.nullcontext()
        with torch.no_grad(), hooks:
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        target = ans[:, 1:]  # token t is predicted at position t-1
        per = ((logp * target).sum(1) / target.sum(1).clamp(min=1)).cpu()
        for row, i in enumerate(idx):
            lls[i] = float(per[row])
        if activations:
            batch = torch.stack([captured[l] for l in range(n_layers)], dim=1)
            if acts is None:
                acts = torch.zeros((len(enc), *batch.shape[1:]), dtype=batch.dtype)
            acts[torch.tensor(idx)] = batch
    return lls, acts


def mean_logliks(model, tokenizer, items: Sequence[tuple[list[dict], str]], batch_size: int = 16) -> list[float]:
    """Each answer's mean per-token log-likelihood given its chat-formatted prompt."""
    return score_answers(model, tokenizer, items, batch_size=batch_size)[0]
