"""Chat endpoints by name: where a Chat Completions server lives, which key it takes, how a
request is shaped, and the client that sends it.

Each backend is a small class registered by name (`@chat_backend("openai")`), so the judge,
config validation and preflight all ask the same object the same questions:

* `problem(base_url)`: what is missing before any run starts (a key, a server address), one
  rule for validation, preflight and runtime;
* `endpoint(...)`: a resolved `ChatEndpoint` (model, server, key, API version) whose `client()`
  sends requests, whose `max_tokens_param` names the token limit the server understands and whose
  `identity()` keys the cache.

A backend that lives in its own module is listed in `_PLUGINS` (name -> module), imported the
first time it is asked for: adding one is its module plus that one line.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from em_core.errors import ConfigError, EmLabError
from em_core.openai_api import ApiError, Secret, async_client, endpoint_id, safe_url

_REGISTRY: dict[str, type[ChatBackend]] = {}
# Backends in modules of their own: imported on first use (name -> module).
_PLUGINS: dict[str, str] = {
    "azure": "em_core.models.chat_azure",
}


def chat_backend(name: str) -> Callable[[type[ChatBackend]], type[ChatBackend]]:
    """Class decorator: register a ChatBackend under `name`."""
    def register(cls: type[ChatBackend]) -> type[ChatBackend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return register


def chat_backend_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*_REGISTRY, *_PLUGINS]))


def get_chat_backend(name: str) -> type[ChatBackend]:
    if name not in _REGISTRY and name in _PLUGINS:
        import importlib

        importlib.import_module(_PLUGINS[name])
    if name not in _REGISTRY:
        raise ConfigError(f"unknown chat backend {name!r}; choose one of {', '.join(chat_backend_names())}")
    return _REGISTRY[name]


@dataclass
class ChatEndpoint:
    """One resolved server: send with `client()`, shape requests with `max_tokens_param`."""

    backend: type[ChatBackend]
    model: str
    base_url: str | None
    api_key: Secret
    settings: dict[str, Any] = field(default_factory=dict)  # backend extras, e.g. api_version

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def max_tokens_param(self) -> str:
        return self.backend.max_tokens_param

    def where(self) -> str:
        """The server, for messages (never with credentials)."""
        return safe_url(self.base_url) or self.backend.default_where

    def client(self, timeout: float, what: str, error_cls: type[EmLabError] = ApiError) -> Any:
        return self.backend.make_client(self, timeout, what, error_cls)

    def identity(self) -> dict[str, Any]:
        """What makes two endpoints the same server for a cache (no key, no credentials)."""
        return {"endpoint": endpoint_id(self.base_url), **self.settings}


class ChatBackend:
    """A Chat Completions server family. Subclasses set the class attributes and override what
    differs; `endpoint()` and `problem()` use them."""

    name: ClassVar[str] = ""
    key_env: ClassVar[str | None] = "OPENAI_API_KEY"
    base_url_env: ClassVar[str | None] = "OPENAI_BASE_URL"
    needs_base_url: ClassVar[bool] = False
    needs_key: ClassVar[bool] = True
    default_model: ClassVar[str | None] = None
    default_where: ClassVar[str] = "api.openai.com"
    max_tokens_param: ClassVar[str] = "max_completion_tokens"
    base_url_example: ClassVar[str] = "http://localhost:8000/v1"

    @classmethod
    def resolve_base_url(cls, base_url: str | None) -> str | None:
        return base_url or (os.environ.get(cls.base_url_env) if cls.base_url_env else None) or None

    @classmethod
    def resolve_key(cls, api_key: str | None, base_url: str | None) -> str | None:
        return api_key or (os.environ.get(cls.key_env) if cls.key_env else None) or None

    @classmethod
    def base_url_problem(cls, base_url: str | None) -> str | None:
        """A missing server address (what a config can check before the environment matters)."""
        if cls.needs_base_url and not cls.resolve_base_url(base_url):
            hint = f" or set {cls.base_url_env}" if cls.base_url_env else ""
            return f"backend {cls.name} needs base_url (e.g. base_url={cls.base_url_example}){hint}"
        return None

    @classmethod
    def problem(cls, base_url: str | None = None, model: str | None = None) -> str | None:
        """What this backend lacks to run, or None: the one rule config checks, preflight and
        `endpoint()` share."""
        missing = cls.base_url_problem(base_url)
        if missing:
            return missing
        if cls.needs_key and not cls.resolve_key(None, base_url):
            return f"backend {cls.name} needs {cls.key_env}, which is not set"
        if not (model or cls.default_model):
            return f"backend {cls.name} needs a model name as the server knows it"
        return None

    @classmethod
    def settings(cls, **extra: Any) -> dict[str, Any]:
        return {}

    @classmethod
    def endpoint(cls, model: str | None, base_url: str | None = None, api_key: str | None = None,
                 **extra: Any) -> ChatEndpoint:
        url = cls.resolve_base_url(base_url)
        model = model or cls.default_model
        missing = cls.base_url_problem(base_url)
        if missing:
            raise ConfigError(missing)
        if not model:
            raise ConfigError(f"backend {cls.name} needs a model name as the server knows it")
        return ChatEndpoint(cls, model, url, Secret(cls.resolve_key(api_key, url)), cls.settings(**extra))

    @classmethod
    def make_client(cls, ep: ChatEndpoint, timeout: float, what: str, error_cls: type[EmLabError]) -> Any:
        return async_client(ep.api_key, ep.base_url, timeout, what, error_cls)


@chat_backend("openai")
class OpenAIChat(ChatBackend):
    """api.openai.com (or OPENAI_BASE_URL): the papers' judges."""

    default_model = "gpt-4o-2024-08-06"


@chat_backend("openai-compatible")
class OpenAICompatibleChat(ChatBackend):
    """Any server speaking Chat Completions (vLLM, `transformers serve`, Ollama): base_url given
    or OPENAI_BASE_URL; a dummy key when none is set (local servers ignore it)."""

    needs_base_url = True
    needs_key = False
    max_tokens_param = "max_tokens"  # older vLLM/Ollama servers know only max_tokens

    @classmethod
    def resolve_key(cls, api_key: str | None, base_url: str | None) -> str | None:
        return super().resolve_key(api_key, base_url) or "EMPTY"


def endpoint_for(backend: str, model: str | None, base_url: str | None = None, api_key: str | None = None,
                 **extra: Any) -> ChatEndpoint:
    """The endpoint of registered backend `backend`."""
    return get_chat_backend(backend).endpoint(model, base_url, api_key, **extra)
