"""A loopback OpenAI-compatible chat-completions server for judge tests and benchmarks.

Runs a stdlib ThreadingHTTPServer on 127.0.0.1 (ephemeral port) in a daemon thread. Behaviour
is configurable: what each prompt gets back, injected HTTP failures, fixed latency. Every
request is logged (including its Authorization header) so tests can check what was sent.
"""
from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence

# prompt -> list of (token, logprob) for a logprobs reply, or a str for a text reply.
Responder = Callable[[str], "Sequence[tuple[str, float]] | str"]


def logprobs_from_probs(probs: dict[str, float]) -> list[tuple[str, float]]:
    """(token, logprob) pairs sorted like an API's top_logprobs (most likely first)."""
    return sorted(((t, math.log(p)) for t, p in probs.items()), key=lambda tp: -tp[1])


def default_responder(prompt: str) -> list[tuple[str, float]]:
    # A fixed, clearly-scored distribution: 80 w.p. 0.6, 90 w.p. 0.4.
    return [("80", math.log(0.6)), ("90", math.log(0.4))]


@dataclass
class RequestLog:
    index: int
    path: str
    authorization: str | None
    body: dict[str, Any] | None
    api_key: str | None = None  # the `api-key` header (Azure OpenAI's auth)
    status: int = 0
    started: float = 0.0
    finished: float = 0.0


@dataclass
class JudgeServer:
    """Start with `.start()` (or use as a context manager); `.base_url` is the /v1 root.

    fail_first: the first N requests get fail_status (e.g. 429, 500, 401).
    fail_after: after that many successful replies, every request gets fail_after_status.
    error_message: the error body's message (may contain "{auth}" to echo the Authorization
    header, as real servers partly do, to test that clients scrub it).
    """

    responder: Responder = default_responder
    latency: float = 0.0
    fail_first: int = 0
    fail_status: int = 429
    fail_after: int | None = None
    fail_after_status: int = 500
    error_message: str = "injected failure"
    error_code: str | None = None  # the error body's "code", e.g. "insufficient_quota"
    # Random faults: each request fails with this probability (status drawn from fault_statuses),
    # seeded so a benchmark run is reproducible.
    fault_rate: float = 0.0
    fault_statuses: tuple[int, ...] = (429, 500)
    fault_seed: int | None = 0
    # Requests whose prompt contains this string always fail with fail_status (one answer whose
    # retries are sure to run out).
    always_fail_marker: str | None = None
    # Speak Azure OpenAI's URL shape instead: POST /openai/deployments/<deployment>/chat/completions
    # ?api-version=<azure_api_version>, key in the `api-key` header; any other path is a 404.
    azure_deployment: str | None = None
    azure_api_version: str = "2024-10-21"
    # what the completion says answered (`model`; default: the requested model) and its
    # `system_fingerprint`, as the real API reports a dated snapshot behind an alias
    served_model: str | None = None
    system_fingerprint: str | None = "fp_judge_loopback"
    requests: list[RequestLog] = field(default_factory=list)
    successes: int = 0
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._rng = random.Random(self.fault_seed)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "JudgeServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real API
            # Headers and body go out in two writes; with Nagle on, the body waits for the
            # client's delayed ACK (~40 ms) and the server would measure itself, not the judge.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 -- stdlib naming
                server._handle(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default 5 refuses bursts of concurrent connections

            def handle_error(self, request: Any, client_address: Any) -> None:
                # Clients that time out or are cancelled hang up mid-reply; that is expected.
                if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
                    return
                super().handle_error(request, client_address)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        # A short poll interval keeps stop() (and so test teardown) fast.
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "JudgeServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def chat_path(self) -> str:
        if self.azure_deployment:
            return (f"/openai/deployments/{self.azure_deployment}/chat/completions"
                    f"?api-version={self.azure_api_version}")
        return "/v1/chat/completions"

    @property
    def endpoint(self) -> str:
        """The server root (Azure's `azure_endpoint`)."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def n_requests(self) -> int:
        with self._lock:
            return len(self.requests)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.successes = 0
            self.max_in_flight = 0

    # -- request handling ---------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = None
        with self._lock:
            entry = RequestLog(
                len(self.requests), h.path, h.headers.get("Authorization"), body, h.headers.get("api-key"),
                started=time.monotonic()
            )
            self.requests.append(entry)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fail = None
            if entry.index < self.fail_first:
                fail = self.fail_status
            elif self.fail_after is not None and self.successes >= self.fail_after:
                fail = self.fail_after_status
            elif self.always_fail_marker and body and self.always_fail_marker in json.dumps(body):
                fail = self.fail_status
            elif self.fault_rate and self._rng.random() < self.fault_rate:
                fail = self._rng.choice(self.fault_statuses)
        try:
            if self.latency:
                time.sleep(self.latency)
            if h.path.rstrip("/") != self.chat_path or body is None:
                status, payload = 404, _error("not found", "invalid_request_error")
            elif fail is not None:
                msg = self.error_message.replace("{auth}", entry.authorization or "")
                status, payload = fail, _error(msg, "rate_limit_exceeded" if fail == 429 else "server_error")
                payload["error"]["code"] = self.error_code
            else:
                status, payload = 200, self._completion(body)
        except Exception as e:  # noqa: BLE001 -- a responder bug must surface as a 500, not a hang
            status, payload = 500, _error(f"responder failed: {e!r}", "server_error")
        data = json.dumps(payload).encode()
        with self._lock:
            entry.status = status
            entry.finished = time.monotonic()
            self.in_flight -= 1
            if status == 200:
                self.successes += 1
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["messages"][-1]["content"]
        reply = self.responder(prompt)
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        if isinstance(reply, str):
            choice["message"] = {"role": "assistant", "content": reply, "refusal": None}
            completion_tokens = max(1, len(reply.split()))
        else:
            top = list(reply)[: int(body.get("top_logprobs") or 0) or len(reply)]
            token = top[0][0] if top else ""
            choice["message"] = {"role": "assistant", "content": token, "refusal": None}
            choice["finish_reason"] = "length"
            completion_tokens = 1
            if body.get("logprobs"):
                entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]
                first = dict(entries[0]) if entries else {"token": "", "logprob": 0.0, "bytes": []}
                choice["logprobs"] = {"content": [{**first, "top_logprobs": entries}], "refusal": None}
        prompt_tokens = len(prompt.split())
        return {
            "id": f"chatcmpl-{time.monotonic_ns()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model or body.get("model", "unknown"),
            "system_fingerprint": self.system_fingerprint,
            "choices": [choice],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
