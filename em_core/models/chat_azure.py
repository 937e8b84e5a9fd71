"""Azure OpenAI as a chat backend (`backend: azure`), the service the EM papers' reference judge
ran on.

The model is the *deployment* name; requests go to
`<endpoint>/openai/deployments/<deployment>/chat/completions?api-version=<version>` with the key
in an `api-key` header (the openai SDK's AzureOpenAI client builds both). The endpoint is
`base_url` or AZURE_OPENAI_ENDPOINT (e.g. https://my-resource.openai.azure.com), the key
AZURE_OPENAI_API_KEY, the API version `api_version` or OPENAI_API_VERSION (default below, a GA
version that serves logprobs). Logprob and text modes work as with OpenAI.
"""
from __future__ import annotations

import os
from typing import Any

from em_core.errors import EmLabError
from em_core.models.chat import ChatBackend, ChatEndpoint, chat_backend
from em_core.openai_api import redact

DEFAULT_API_VERSION = "2024-10-21"


@chat_backend("azure")
class AzureChat(ChatBackend):
    key_env = "AZURE_OPENAI_API_KEY"
    base_url_env = "AZURE_OPENAI_ENDPOINT"
    needs_base_url = True
    default_where = "Azure OpenAI"
    base_url_example = "https://<resource>.openai.azure.com"

    @classmethod
    def settings(cls, api_version: str | None = None, **_: Any) -> dict[str, Any]:
        return {"api_version": api_version or os.environ.get("OPENAI_API_VERSION") or DEFAULT_API_VERSION}

    @classmethod
    def make_client(cls, ep: ChatEndpoint, timeout: float, what: str, error_cls: type[EmLabError]) -> Any:
        import openai

        key = ep.api_key.get()
        if not key:
            raise error_cls(f"no API key for {what}: set {cls.key_env}")
        try:
            return openai.AsyncAzureOpenAI(api_key=key, azure_endpoint=ep.base_url, timeout=timeout,
                                           api_version=ep.settings["api_version"], max_retries=0)
        except openai.OpenAIError as e:
            problem = redact(str(e), key)
        raise error_cls(f"cannot create the client for {what}: {problem}")
