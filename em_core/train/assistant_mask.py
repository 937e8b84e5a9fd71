"""Assistant-only labels for any chat template, with or without `{% generation %}` markers.

Hub templates (ChatML, Llama 3, ...) have no generation markers, so TRL cannot build an assistant
mask from them; its prompt/completion fallback trains only the last assistant turn and also the
text the template puts after the turn's end token. Here every assistant turn is located by
rendering the conversation's prefixes: the turn's tokens are those between "everything before it
+ the generation prompt" and "everything up to and including it". Whatever the template injects
(a default system prompt, role headers) lies outside those spans, and the span is cut after the
turn's end-of-turn token, so the model learns the reply and when to stop, nothing else.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)
IGNORE = -100


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes its own special tokens (bos, role markers); do not add them twice.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer, extra: Iterable[int] = ()) -> set[int]:
    """Token ids that close an assistant turn: the tokenizer's eos plus `extra` (e.g. the model's
    generation_config eos ids, which may list several)."""
    ids = {int(i) for i in extra if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def assistant_labels(tokenizer, messages: list[dict], end_ids: set[int] | None = None) -> dict[str, list[int]]:
    """{"input_ids", "labels"} for one conversation: labels equal input_ids on the tokens of every
    assistant reply (content and its end-of-turn token) and IGNORE everywhere else.

    Raises ValueError when a rendered prefix is not a prefix of the full conversation (a template
    that rewrites earlier turns), since the mask would then be a guess."""
    end_ids = end_of_turn_ids(tokenizer) if end_ids is None else end_ids
    full = _ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tokenizer, messages[:i], add_generation_prompt=True))
        upto = _ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(upto)] != upto or upto[:start] != full[:start]:
            raise ValueError(f"chat template renders turn {i} differently inside the full conversation; "
                             "cannot locate the assistant tokens (use a template with {% generation %} markers)")
        end = len(upto)
        # Cut after the last end-of-turn token: the template's trailing newline etc. is not the reply.
        closing = [j for j in range(start, end) if full[j] in end_ids]
        if closing:
            end = closing[-1] + 1
        labels[start:end] = full[start:end]
    return {"input_ids": full, "labels": labels}


def tokenized_rows(tokenizer, rows: list[dict], max_length: int | None, end_ids: set[int] | None = None,
                   what: str = "dataset") -> list[dict]:
    """Every row as input_ids + labels, cut to `max_length`. Rows whose assistant tokens all fall
    beyond `max_length` would train nothing; they are dropped with a warning naming how many, and
    rows cut inside a reply are counted too (they never see their end-of-turn token)."""
    out, dropped, cut = [], 0, 0
    for row in rows:
        enc = assistant_labels(tokenizer, row["messages"], end_ids)
        if max_length and len(enc["input_ids"]) > max_length:
            enc = {k: v[:max_length] for k, v in enc.items()}
            if all(x == IGNORE for x in enc["labels"]):
                dropped += 1
                continue
            cut += 1
        out.append(enc)
    if dropped or cut:
        log.warning("%s: %d of %d rows are longer than max_length=%d: %d cut inside a reply, %d dropped "
                    "(no reply token left); raise max_length to keep them whole",
                    what, dropped + cut, len(rows), max_length, cut, dropped)
    if not out:
        raise ValueError(f"{what}: no row has an assistant token within max_length={max_length}")
    return out
