"""Shared plumbing for calls to the OpenAI API or an OpenAI-compatible server.

The judge, OpenAI-model evaluation and dataset generation all send many chat requests
concurrently; they share one retry policy (429/408/409/5xx, timeouts and connection errors back
off exponentially with jitter, honouring Retry-After; other 4xx fail at once) and one way of
keeping the API key out of reprs, logs and error messages (some servers echo it in error bodies).
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeVar

from em_core.errors import EmLabError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Key-shaped strings in server error bodies (OpenAI echoes a masked key on 401).
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-\*\.]{3,}")
_MAX_ERROR_CHARS = 400


class ApiError(EmLabError):
    """An OpenAI(-compatible) API could not be used: auth, bad request, retries exhausted."""


class Secret:
    """Holds an API key so that repr(), vars() and debuggers show a mask, not the key."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret(None)"

    __str__ = __repr__


def redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    text = _KEY_LIKE.sub("sk-***", text)
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "..."


def safe_url(url: str | None) -> str | None:
    """`url` without user:password@ (for reprs, params and messages)."""
    return None if url is None else re.sub(r"//[^/@]*@", "//", url)


def endpoint_id(url: str | None) -> str:
    """The server a request goes to, for cache keys: the base URL without credentials, query or
    trailing slash (no URL: api.openai.com)."""
    clean = (safe_url(url) or "https://api.openai.com/v1").split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = clean.partition("://")
    host, slash, tail = rest.partition("/")
    return f"{scheme.lower()}{sep}{host.lower()}{slash}{tail}".rstrip("/")


def retry_after(headers: Any) -> float | None:
    try:
        if headers.get("retry-after-ms") is not None:
            return float(headers["retry-after-ms"]) / 1000.0
        if headers.get("retry-after") is not None:
            return float(headers["retry-after"])
    except (TypeError, ValueError):  # an HTTP-date or junk: use our own backoff
        return None
    return None


def resolve_key(api_key: str | None, base_url: str | None) -> str | None:
    """The key to use: given, else OPENAI_API_KEY; a non-OpenAI server gets a dummy if neither
    (local servers ignore it, but the client insists on one)."""
    key = api_key or os.environ.get("OPENAI_API_KEY") or None
    if key is None and base_url:
        key = "EMPTY"
    return key


def async_client(secret: Secret, base_url: str | None, timeout: float, what: str,
                 error_cls: type[EmLabError] = ApiError) -> Any:
    """An AsyncOpenAI client with the SDK's own retries off (they are counted here instead)."""
    import openai

    key = secret.get()
    if not key:
        raise error_cls(f"no API key for {what}: set OPENAI_API_KEY (or point base_url at an OpenAI-compatible server)")
    kwargs: dict[str, Any] = {"max_retries": 0, "timeout": timeout}
    if base_url:
        # user:password@ in the URL would make httpx send Basic auth instead of the API key
        kwargs["base_url"] = safe_url(base_url)
    problem = None
    try:
        return openai.AsyncOpenAI(api_key=key, **kwargs)
    except openai.OpenAIError as e:
        problem = redact(str(e), key)
    raise error_cls(f"cannot create the client for {what}: {problem}")


async def post_with_retries(
    client: Any,
    path: str,
    body: dict[str, Any],
    parse: Callable[[Any], T],
    *,
    what: str,
    secret: Secret,
    max_retries: int,
    backoff_base: float = 1.0,
    backoff_max: float = 60.0,
    stats: MutableMapping[str, Any] | None = None,
    error_cls: type[EmLabError] = ApiError,
    where: str = "api.openai.com",
) -> T:
    """POST `body` to `path` and return `parse(json)`, retrying transient failures.

    `stats` (if given) counts `requests` (attempts) and `retries`. A reply `parse` cannot read is
    fatal (KeyError/IndexError/TypeError/ValueError/AttributeError), as are 4xx other than
    408/409/429 and a 429 for exhausted quota. Errors never chain the SDK exception, which holds
    the request and so the Authorization header.
    """
    import openai

    for attempt in range(max_retries + 1):
        if stats is not None:
            stats["requests"] = stats.get("requests", 0) + 1
        fatal: str | None = None
        problem = ""
        wait_hint: float | None = None
        try:
            # client.post (the SDK's documented raw-request call) instead of the typed methods:
            # same endpoint, auth and errors without the per-request pydantic models, which
            # cost about a third of the client's CPU per request at high concurrency.
            resp = await client.post(path, body=body, cast_to=dict)
        except openai.APIStatusError as e:
            msg = redact(str(getattr(e, "message", "") or ""), secret.get())
            if e.status_code == 429 and getattr(e, "code", None) == "insufficient_quota":
                fatal = f"{what}: the account is out of quota: {msg}"
            elif e.status_code in (408, 409, 429) or e.status_code >= 500:
                problem = f"HTTP {e.status_code}"
                wait_hint = retry_after(e.response.headers)
            else:
                fatal = f"{what}: request rejected with HTTP {e.status_code}: {msg}"
                if e.status_code in (401, 403):
                    fatal += " -- check the API key (OPENAI_API_KEY or api_key)"
        except openai.APITimeoutError:
            problem = "timeout"
        except openai.APIConnectionError:
            problem = f"cannot connect to {where}"
        except openai.APIError as e:  # e.g. a body that is not JSON
            fatal = f"{what}: unusable response: {redact(str(e), secret.get())}"
        else:
            try:
                return parse(resp)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                fatal = f"{what}: malformed response from {where}: {type(e).__name__}: {e}"
        if fatal is not None:
            raise error_cls(fatal)
        if attempt == max_retries:
            err = error_cls(f"{what}: still failing after {max_retries + 1} attempts: {problem}")
            err.retries_exhausted = True  # type: ignore[attr-defined]  # callers may record, not abort
            raise err
        if stats is not None:
            stats["retries"] = stats.get("retries", 0) + 1
        delay = min(backoff_max, backoff_base * 2**attempt)
        delay = delay / 2 + random.uniform(0, delay / 2)  # jitter so throttled workers spread out
        if wait_hint is not None:
            delay = min(backoff_max, max(delay, wait_hint))
        log.warning("%s failed (%s); retry %d/%d in %.2fs", what, problem, attempt + 1, max_retries, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def run_sync(coro: Any) -> Any:
    """Run `coro` to completion from sync code, also when called inside a running event loop
    (notebooks), where asyncio.run would refuse: then on a private loop in a worker thread. The
    one async-from-sync bridge of the one-shot callers (API sampling, dataset generation); the
    judge keeps a loop of its own across calls (its cache and clients live on it)."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def retries_exhausted(error: BaseException) -> bool:
    """Whether `error` is a transient failure that outlasted its retries (as opposed to a fatal
    one such as a bad key): a caller judging many items can record it for that item and go on."""
    return bool(getattr(error, "retries_exhausted", False))


async def run_all(coros: list, prefer: type[BaseException] = ApiError) -> None:
    """Run `coros` concurrently. On the first failure cancel the rest (whatever already arrived
    was delivered) and raise it, an error of type `prefer` before any other."""
    tasks = [asyncio.create_task(c) for c in coros]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        if errors:
            raise next((e for e in errors if isinstance(e, prefer)), errors[0])
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# USD per 1M tokens (input, output), OpenAI list prices for standard (non-batch, uncached)
# requests. An estimate only: cached-input discounts and batch pricing are ignored.
PRICES_PER_1M: dict[str, tuple[float, float]] = {
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o-2024-11-20": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "o4-mini": (1.10, 4.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
}

_DATE_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def price_for(model: str, prices: Mapping[str, tuple[float, float]] | None = None) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for a model; dated snapshots fall back to their base
    name ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"). None when unknown."""
    table = PRICES_PER_1M if prices is None else prices
    if model in table:
        return table[model]
    return table.get(_DATE_SUFFIX.sub("", model))


def estimate_cost(
    model: str, prompt_tokens: int, completion_tokens: int, prices: Mapping[str, tuple[float, float]] | None = None
) -> float | None:
    """Estimated USD for the given usage, or None for a model not in the price table."""
    p = price_for(model, prices)
    if p is None:
        return None
    return (prompt_tokens * p[0] + completion_tokens * p[1]) / 1e6
