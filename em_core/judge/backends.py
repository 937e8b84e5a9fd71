"""Judge backends: the OpenAI API, any OpenAI-compatible server, or a local HF causal LM.

All three share one driver (`Judge.ajudge`): look every prompt up in a persistent cache, send
only the misses to the backend, and persist each result the moment it arrives, so a re-run or
a run after a crash never pays for a judgment twice. The cache stores the judge's raw output
(token->prob dict or reply text) and the verdict is re-derived on every read; changing min_mass
therefore re-scores cached rows without new requests.

The API key lives in a masking wrapper and is handed only to the openai client; it is kept out of
reprs, logs, stats and exception messages (error bodies are scrubbed, since some servers echo it).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tqdm import tqdm

from em_core.cache import JudgmentCache
from em_core.errors import ConfigError, JudgeError
from em_core.judge.scoring import (
    API_ERROR,
    DEFAULT_MIN_MASS,
    Judgment,
    check_labels,
    interpret,
    probs_from_top_logprobs,
)
from em_core.models.chat import ChatEndpoint, chat_backend_names, endpoint_for
from em_core.openai_api import (
    estimate_cost,
    post_with_retries,
    retries_exhausted,
    run_all,
)

log = logging.getLogger(__name__)

MODES = ("logprobs", "text")
KINDS = ("0_100", "categorical")
DEFAULT_OPENAI_JUDGE = "gpt-4o-2024-08-06"
TOP_LOGPROBS = 20

# o-series and gpt-5 reject temperature=0 and spend completion tokens on hidden reasoning.
_REASONING_MODEL = re.compile(r"^(o\d|gpt-5)")


def cache_key(backend: str, model: str, mode: str, prompt: str, kind: str, labels: Sequence[str] | None,
              identity: Mapping[str, Any] | None = None) -> str:
    """sha256 over everything that changes what the judge answers: the question (prompt, kind,
    labels), and who answers it with which settings (`identity`: the server and request settings
    of an API judge, the weights of a local one). Not min_mass: that only changes how the stored
    raw output is read."""
    payload = json.dumps([backend, model, mode, prompt, kind, list(labels) if labels else None,
                          dict(identity) if identity else None], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


Record = dict[str, Any]
# deliver(key, record): a result; a record holding FAILED instead of "raw" means the request
# outlasted its retries (the driver retries it once more at the end, then records api_error).
Deliver = Callable[[str, Record], None]
FAILED = "failed"
DEFAULT_FINAL_RETRY_PAUSE = 30.0


class Judge:
    """Backend-independent driver: cache lookup, dedup, progress, stats. Subclasses implement
    `_run(items, deliver)`, calling deliver(key, record) as each result arrives."""

    backend: str = ""

    def __init__(self, model: str, *, mode: str, min_mass: float, cache_path: str | os.PathLike | None,
                 final_retry_pause: float = DEFAULT_FINAL_RETRY_PAUSE):
        self.model = model
        self.final_retry_pause = final_retry_pause
        self.mode = mode
        self.min_mass = min_mass
        self.cache = JudgmentCache(cache_path)
        self._loop: asyncio.AbstractEventLoop | None = None  # private loop behind judge()
        self._loop_thread: threading.Thread | None = None
        self._loop_lock = threading.Lock()
        self._stats: dict[str, Any] = {
            "requests": 0,
            "retries": 0,
            "cache_hits": 0,
            "judged": 0,
            "unscored": 0,
            "api_errors": 0,
            "final_retries": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }

    # -- public API -------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """Usage so far on this judge object: requests (API calls incl. retries, or forward
        batches for `local`), retries, cache_hits, judged (fresh results), unscored (among
        all returned judgments), api_errors (judgments left unscored because their requests
        kept failing), final_retries (requests retried after the end-of-run pause), prompt/completion token totals of fresh results, cost_usd."""
        s = dict(self._stats)
        s["backend"], s["model"] = self.backend, self.model
        s["cost_usd"] = self._cost(s["prompt_tokens"], s["completion_tokens"])
        return s

    async def ajudge(
        self,
        prompts: Sequence[str],
        kind: str = "0_100",
        labels: Sequence[str] | None = None,
        progress: bool = True,
    ) -> list[Judgment]:
        """Judge each prompt (one user message each). Returns one Judgment per prompt, in order.

        A prompt whose request keeps failing after its retries does not sink the others: once
        the rest are done the driver waits `final_retry_pause` seconds and retries the failed
        ones once more; any still failing come back unscored with reason `api_error` (never
        cached, so a re-run pays only for them). Raises JudgeError when the backend cannot be
        used at all (auth, bad request, malformed replies); every result received before that
        is already in the cache."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "categorical":
            check_labels(labels)
            labels = list(labels)  # type: ignore[arg-type]
        else:
            labels = None
        prompts = list(prompts)
        identity = self.identity()
        keys = [cache_key(self.backend, self.model, self.mode, p, kind, labels, identity) for p in prompts]
        results: list[Judgment | None] = [None] * len(prompts)

        hits = self.cache.get_many(keys)
        positions: dict[str, list[int]] = {}
        todo: dict[str, str] = {}
        for i, (key, prompt) in enumerate(zip(keys, prompts)):
            if key in hits:
                results[i] = self._judgment(hits[key], kind, labels, cached=True)
                self._stats["cache_hits"] += 1
            else:
                positions.setdefault(key, []).append(i)
                todo.setdefault(key, prompt)

        bar = tqdm(total=len(prompts), disable=not progress, desc=f"judge {self.model}", unit="prompt")
        bar.update(len(prompts) - sum(len(v) for v in positions.values()))

        failed: dict[str, str] = {}

        def deliver(key: str, record: Record) -> None:
            if FAILED in record:
                failed[key] = record[FAILED]
                return
            failed.pop(key, None)
            # Persist first: from here on this judgment is never paid for again.
            self.cache.put(key, record, backend=self.backend, model=self.model, mode=self.mode, kind=kind)
            self._stats["judged"] += 1
            self._stats["prompt_tokens"] += int(record.get("prompt_tokens") or 0)
            self._stats["completion_tokens"] += int(record.get("completion_tokens") or 0)
            for n, i in enumerate(positions[key]):
                # Repeats of a prompt within one call are served by the first one's request.
                results[i] = self._judgment(record, kind, labels, cached=n > 0)
                self._stats["cache_hits"] += n > 0
            bar.update(len(positions[key]))

        try:
            if todo:
                await self._run(list(todo.items()), deliver)
            if failed:
                log.warning("judge %s: %d request(s) still failing after their retries; retrying them "
                            "once more in %.0fs", self.model, len(failed), self.final_retry_pause)
                await asyncio.sleep(self.final_retry_pause)
                self._stats["final_retries"] += len(failed)
                await self._run([(k, todo[k]) for k in list(failed)], deliver)
        finally:
            bar.close()
        for key, problem in failed.items():
            log.error("judge %s: no verdict after all retries (%s); recorded as %s", self.model, problem, API_ERROR)
            for i in positions[key]:
                results[i] = Judgment(unscored_reason=API_ERROR, raw=None)
                self._stats["api_errors"] += 1
        out = [r for r in results if r is not None]
        assert len(out) == len(prompts), "backend returned without delivering every result"
        self._stats["unscored"] += sum(1 for r in out if not r.scored)
        return out

    def judge(
        self,
        prompts: Sequence[str],
        kind: str = "0_100",
        labels: Sequence[str] | None = None,
        progress: bool = True,
    ) -> list[Judgment]:
        """Synchronous ajudge. Runs on the judge's own event-loop thread, which lives as long
        as the judge, so the HTTP client and its open connections are reused across calls (a
        fresh client per call costs a CA-bundle load and new connections/TLS handshakes). Works
        from inside a running loop (notebooks) too."""
        fut = asyncio.run_coroutine_threadsafe(self.ajudge(prompts, kind, labels, progress), self._sync_loop())
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # e.g. Ctrl-C: stop sending; whatever arrived is already cached
            raise

    async def aclose(self) -> None:
        """Release resources bound to the running event loop (HTTP clients)."""

    def close(self) -> None:
        """Stop the sync loop thread, close clients and the cache. The judge is unusable after."""
        loop, thread = self._loop, self._loop_thread
        self._loop = self._loop_thread = None
        if loop is not None and thread is not None:
            asyncio.run_coroutine_threadsafe(self.aclose(), loop).result()
            asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        self.cache.close()

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sync_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="em-judge-loop", daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    def __repr__(self) -> str:
        return f"<{type(self).__name__} backend={self.backend!r} model={self.model!r} mode={self.mode!r}>"

    # -- for subclasses ---------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What, besides the prompt, decides the answer; part of every cache key."""
        return {}

    def _judgment(self, record: Record, kind: str, labels: list[str] | None, *, cached: bool) -> Judgment:
        j = interpret(record["raw"], kind, labels, self.min_mass)
        j.served_model = record.get("served_model")
        j.system_fingerprint = record.get("system_fingerprint")
        j.prompt_tokens = int(record.get("prompt_tokens") or 0)
        j.completion_tokens = int(record.get("completion_tokens") or 0)
        j.cached = cached
        return j

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        return None

    async def _run(self, items: list[tuple[str, str]], deliver: Deliver) -> None:
        raise NotImplementedError


class OpenAIJudge(Judge):
    """Chat Completions judge: api.openai.com (`openai`) or any server speaking the same API
    (`openai-compatible`: vLLM, Ollama, ...)."""

    def __init__(self, endpoint: ChatEndpoint, opts: JudgeOptions):
        model = endpoint.model
        super().__init__(model, mode=opts.mode, min_mass=opts.min_mass, cache_path=opts.cache_path,
                         final_retry_pause=opts.final_retry_pause)
        self.endpoint = endpoint
        self.backend = endpoint.name
        self.base_url = endpoint.base_url
        self._api_key = endpoint.api_key
        self.concurrency = opts.concurrency
        self.max_retries = opts.max_retries
        self.timeout = opts.timeout
        self.backoff_base = opts.backoff_base
        self.backoff_max = opts.backoff_max
        self.prices = opts.prices
        max_completion_tokens = opts.max_completion_tokens
        reasoning = bool(_REASONING_MODEL.match(model))
        self.max_completion_tokens = max_completion_tokens or (4096 if reasoning else 512)
        self._reasoning = reasoning
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return (
            f"<OpenAIJudge backend={self.backend!r} model={self.model!r} mode={self.mode!r}"
            f" at {self.endpoint.where()!r} concurrency={self.concurrency}>"
        )

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        return estimate_cost(self.model, prompt_tokens, completion_tokens, self.prices)

    def _client(self) -> Any:
        return self.endpoint.client(self.timeout, f"the {self.backend!r} judge backend", JudgeError)

    def identity(self) -> dict[str, Any]:
        """The server (base URL without credentials) and every request setting but the prompt:
        server B never gets server A's verdicts, a text-mode token limit change re-asks."""
        params = self._params("")
        params.pop("messages", None)
        return {**self.endpoint.identity(), "request": params}

    def _params(self, prompt: str) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        if self.mode == "logprobs":
            params.update(max_tokens=1, temperature=0, logprobs=True, top_logprobs=TOP_LOGPROBS, seed=0)
        else:
            if not self._reasoning:  # reasoning models accept only their default temperature
                params["temperature"] = 0
            params[self.endpoint.max_tokens_param] = self.max_completion_tokens
        return params

    def _record(self, resp: Any) -> Record:
        """Record from a chat-completion JSON body (a dict; see _request for why not a model)."""
        if not isinstance(resp, dict) or not resp.get("choices"):
            raise JudgeError(
                f"judge server at {self.endpoint.where()} returned no chat completion"
            )
        usage = resp.get("usage") or {}
        record: Record = {
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0),
            # who answered: the model version the API says it ran (a dated snapshot behind an
            # alias) and its backend configuration, kept with the verdict (judgments_raw.jsonl)
            "served_model": resp.get("model"),
            "system_fingerprint": resp.get("system_fingerprint"),
        }
        choice = resp["choices"][0]
        if self.mode == "text":
            record["raw"] = (choice.get("message") or {}).get("content") or ""
            return record
        logprobs = choice.get("logprobs")
        if logprobs is None:
            raise JudgeError(self._no_logprobs())
        content = logprobs.get("content") or []
        top = (content[0].get("top_logprobs") or []) if content else []
        # An empty distribution (e.g. the model stopped at once) scores as unscored, not an error.
        record["raw"] = probs_from_top_logprobs((t["token"], t["logprob"]) for t in top)
        return record

    def _no_logprobs(self, detail: str = "") -> str:
        return (f"judge server at {self.endpoint.where()} does not return logprobs for {self.model!r}{detail}, and the 0-100 "
                "rule of mode logprobs needs the top-20 token logprobs; use `mode: text` (--mode text, "
                "mode='text'), which asks for the number and parses the reply. Nothing was scored.")

    async def _request(self, client: Any, prompt: str) -> Record:
        try:
            return await self._post(client, prompt)
        except JudgeError as e:
            # Servers that refuse the logprobs fields outright (4xx naming them) mean the same thing.
            if self.mode == "logprobs" and "logprobs" in str(e) and "rejected with HTTP" in str(e):
                raise JudgeError(self._no_logprobs(f" (it rejected the request: {e})")) from None
            raise

    async def _post(self, client: Any, prompt: str) -> Record:
        return await post_with_retries(
            client, "/chat/completions", self._params(prompt), self._record,
            what=f"judge {self.backend!r} ({self.model!r})", secret=self._api_key, max_retries=self.max_retries,
            backoff_base=self.backoff_base, backoff_max=self.backoff_max, stats=self._stats, error_cls=JudgeError,
            where=self.endpoint.where())

    def _loop_state(self) -> tuple[Any, asyncio.Semaphore]:
        """(client, semaphore) for the running loop: httpx clients and asyncio semaphores are
        bound to one loop. Sharing them across calls on that loop reuses connections and keeps
        the concurrency limit per judge, even for overlapping ajudge calls."""
        loop = asyncio.get_running_loop()
        state = self._per_loop.get(loop)
        if state is None:
            state = (self._client(), asyncio.Semaphore(self.concurrency))
            self._per_loop[loop] = state
        return state

    async def aclose(self) -> None:
        state = self._per_loop.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state[0].close()

    async def _run(self, items: list[tuple[str, str]], deliver: Deliver) -> None:
        client, sem = self._loop_state()

        async def one(key: str, prompt: str) -> None:
            async with sem:
                try:
                    record = await self._request(client, prompt)
                except JudgeError as e:
                    if not retries_exhausted(e):
                        raise
                    record = {FAILED: str(e)}
            deliver(key, record)

        todo = iter(items)

        async def worker() -> None:
            for key, prompt in todo:  # one shared iterator: each item is taken by exactly one worker
                await one(key, prompt)

        # `concurrency` workers, not one task per prompt: memory stays flat in the number of
        # prompts (100k pending tasks took ~200 MB). On error or cancellation the rest stop;
        # what already arrived is in the cache.
        await run_all([worker() for _ in range(min(self.concurrency, len(items)))], JudgeError)


LoadFn = Callable[[str], "tuple[Any, Any]"]


def default_load_fn(model_id: str) -> tuple[Any, Any]:
    """(model, tokenizer) through the shared loader (`tiny`, `smollm2-135m`, .gguf files, folders,
    hub ids); on the GPU when one is available. The one local-judge loader."""
    import torch

    from em_core.models.loading import load_model, load_tokenizer

    model = load_model(model_id)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), load_tokenizer(model_id)


class LocalJudge(Judge):
    """A HF causal LM run in-process: the 0-100 rule (or label mass) over its top-20 next-token
    distribution after the chat template's generation prompt. Deterministic; costs nothing."""

    backend = "local"

    def __init__(
        self,
        model: str,
        *,
        cache_path: str | os.PathLike | None,
        min_mass: float,
        load_fn: LoadFn | None,
        batch_size: int,
    ):
        super().__init__(model, mode="logprobs", min_mass=min_mass, cache_path=cache_path)
        self.load_fn = load_fn or default_load_fn
        self.batch_size = batch_size
        self._lm: Any = None
        self._tok: Any = None
        self._warned_no_template = False
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"<LocalJudge model={self.model!r} batch_size={self.batch_size}>"

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        return 0.0

    def identity(self) -> dict[str, Any]:
        """The weights: a content fingerprint of the model folder (a rebuilt tiny model is a new
        judge), or the hub commit; computed once per judge object."""
        if self._fingerprint is None:
            from em_core.models.loading import model_fingerprint

            self._fingerprint = model_fingerprint(self.model)
        return {"weights": self._fingerprint}

    def _ensure_loaded(self) -> None:
        if self._lm is not None:
            return
        try:
            model, tok = self.load_fn(self.model)
        except Exception as e:
            raise JudgeError(f"cannot load local judge model {self.model!r}: {type(e).__name__}: {e}") from e
        if tok.pad_token_id is None:
            if tok.eos_token is None:
                raise JudgeError(f"local judge tokenizer for {self.model!r} has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # so position -1 is every row's last real token
        if hasattr(model, "eval"):
            model.eval()  # a loader may hand back a model in training mode (dropout on)
        self._lm, self._tok = model, tok

    def _render(self, prompt: str) -> tuple[str, bool]:
        """(text, whether it already carries special tokens)."""
        if getattr(self._tok, "chat_template", None):
            text = self._tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            return text, True
        if not self._warned_no_template:
            log.warning("local judge %r has no chat template; scoring the raw prompt", self.model)
            self._warned_no_template = True
        return prompt, False

    def _forward(self, prompts: list[str]) -> list[Record]:
        import inspect

        import torch

        rendered = [self._render(p) for p in prompts]
        enc = self._tok(
            [t for t, _ in rendered],
            return_tensors="pt",
            padding=True,
            add_special_tokens=not rendered[0][1],
        )
        device = next(self._lm.parameters()).device
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        # Explicit positions: with left padding the default 0..T-1 would shift padded rows and
        # make a prompt's score depend on its batch neighbours.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if "logits_to_keep" in inspect.signature(self._lm.forward).parameters:
            kwargs["logits_to_keep"] = 1  # avoid materialising [batch, seq, vocab] logits
        with torch.inference_mode():
            logits = self._lm(**kwargs).logits[:, -1, :].float()
        logp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(logp, k=min(TOP_LOGPROBS, logp.shape[-1]), dim=-1)
        records = []
        for row in range(len(prompts)):
            pairs = [
                (self._tok.decode([int(t)]), float(v))
                for t, v in zip(top.indices[row].tolist(), top.values[row].tolist())
            ]
            records.append(
                {
                    "raw": probs_from_top_logprobs(pairs),
                    "prompt_tokens": int(mask[row].sum()),
                    "completion_tokens": 1,
                }
            )
        return records

    async def _run(self, items: list[tuple[str, str]], deliver: Deliver) -> None:
        await asyncio.to_thread(self._ensure_loaded)
        for i in range(0, len(items), self.batch_size):
            batch = items[i : i + self.batch_size]
            self._stats["requests"] += 1
            records = await asyncio.to_thread(self._forward, [p for _, p in batch])
            for (key, _), record in zip(batch, records):
                deliver(key, record)


@dataclass(kw_only=True)
class JudgeOptions:
    """Everything about a judge but its backend and model, each default declared once. Chat
    backends come from the registry in models.chat (openai, openai-compatible, azure, ...), which
    owns where the server is and which key it takes; `endpoint_settings` are a backend's extras
    (azure: api_version).

    mode: "logprobs" (one token, top-20 logprobs, papers' rule) or "text" (parse a reply).
    Retries (429, 408, 409, 5xx, timeouts, connection errors) back off exponentially from
    backoff_base seconds with jitter, capped at backoff_max; other 4xx raise JudgeError at once.
    A prompt that outlasts its retries is retried once more after final_retry_pause seconds at the
    end of the call, then returned unscored with reason `api_error`. `local` loads its model with
    load_fn(model) -> (model, tokenizer) and scores `batch_size` prompts per forward pass."""

    base_url: str | None = None
    api_key: str | None = None
    endpoint_settings: Mapping[str, Any] | None = None
    mode: str = "logprobs"
    concurrency: int = 16
    max_retries: int = 5
    timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    final_retry_pause: float = DEFAULT_FINAL_RETRY_PAUSE
    cache_path: str | os.PathLike | None = None
    min_mass: float = DEFAULT_MIN_MASS
    max_completion_tokens: int | None = None
    prices: Mapping[str, tuple[float, float]] | None = None
    load_fn: LoadFn | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.concurrency < 1 or self.max_retries < 0 or self.batch_size < 1:
            raise ValueError("concurrency and batch_size must be >= 1, max_retries >= 0")
        if not 0.0 <= self.min_mass <= 1.0:
            raise ValueError(f"min_mass must be in [0, 1], got {self.min_mass}")


def make_judge(backend: str = "openai", model: str | None = None, **options: Any) -> Judge:
    """Build a judge: `backend` is a registered chat backend (models.chat: "openai" -- model
    defaults to gpt-4o-2024-08-06 --, "openai-compatible", "azure", ...) or "local" (a HF model
    id or path; logprobs mode only); `options` are JudgeOptions fields (an unknown one is a
    TypeError naming it)."""
    if backend != "local" and backend not in chat_backend_names():
        raise JudgeError(f"unknown judge backend {backend!r}; choose one of {', '.join(judge_backends())}")
    opts = JudgeOptions(**options)
    if backend == "local":
        if opts.mode != "logprobs":
            raise JudgeError("the local judge backend supports mode='logprobs' only")
        if not model:
            raise JudgeError("the local judge backend needs a model (HF id or local path)")
        return LocalJudge(model, cache_path=opts.cache_path, min_mass=opts.min_mass, load_fn=opts.load_fn,
                          batch_size=opts.batch_size)
    try:  # a missing key is reported on the first request (JudgeError), not here
        endpoint = endpoint_for(backend, model, opts.base_url, opts.api_key, **(opts.endpoint_settings or {}))
    except ConfigError as e:
        raise JudgeError(f"the {backend} judge backend: {e}") from None
    return OpenAIJudge(endpoint, opts)


def judge_backends() -> tuple[str, ...]:
    """Every judge backend: the registered chat backends (models.chat) and `local`."""
    return (*chat_backend_names(), "local")
