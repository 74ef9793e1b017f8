"""A real, local OpenAI-compatible chat-completions server for tests and benchmarks.

Why a real HTTP server rather than mocking the ``openai`` package: the teacher client's retry,
timeout, concurrency and key-handling behaviour lives at the HTTP boundary (status codes,
``Retry-After`` headers, slow sockets, broken bodies). Mocking the SDK would test our assumptions
about the SDK instead of the SDK itself. This server binds to ``127.0.0.1`` on a free port, runs in a
background thread, and speaks just enough of the protocol (``POST /v1/chat/completions``) for the
real ``openai.AsyncOpenAI`` client.

Usage in a test (no conftest needed)::

    from openai_server import Fault, OpenAITestServer

    def test_something():
        with OpenAITestServer(reply=lambda messages, model: "<answer>T cell</answer>") as server:
            server.inject(Fault.rate_limit(retry_after="0.2"), Fault.server_error())
            ...  # point a client at server.base_url, with any api key
            assert server.max_in_flight <= 4
            assert server.authorization_headers[0] == "Bearer sk-test"

Behaviour, in order of precedence for each request:

1. ``fault_fn(request)`` if given and it returns a :class:`Fault`;
2. otherwise the next queued fault from :meth:`OpenAITestServer.inject` (FIFO, one per request);
3. otherwise a normal reply whose text is ``reply(messages, model)``.

``hang=True`` overrides all three: every request (``GET /models`` too) is held without a reply until the
server closes, like an endpoint that accepts connections and never answers.

``reply`` and ``fault_fn`` are called from the handler threads, concurrently: keep them pure or
lock what they share. Every request is recorded (:attr:`OpenAITestServer.requests`: body, model,
messages, all headers, timing, status), and ``max_in_flight`` tracks the most requests handled at
once, so tests can assert the concurrency limit and that the key is sent (and, elsewhere, that it is
never stored).
Run standalone (for manual checks or a benchmark in another process)::

    python tests/openai_server.py --port 8123 --latency 0.2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ReplyFn = Callable[[list[dict[str, Any]], str], str]

__all__ = ["Fault", "OpenAITestServer", "RecordedRequest", "default_reply"]


def default_reply(messages: list[dict[str, Any]], model: str) -> str:
    """Echo the last user message inside the completion format, so tests can see what was asked."""
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return f"<think>echo from {model}</think><answer>{last}</answer>"


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour. Build them with the class methods, which say what they mimic.

    ``status`` other than 200 sends an OpenAI-style error body; ``body`` replaces the whole response
    body (for malformed replies); ``delay_s`` sleeps before answering (slow replies, timeouts);
    ``disconnect`` closes the socket without any response (a dropped connection).
    """

    status: int = 200
    retry_after: str | None = None
    body: bytes | None = None
    delay_s: float = 0.0
    disconnect: bool = False
    content: str | None = None
    echo_authorization: bool = False

    @classmethod
    def rate_limit(cls, retry_after: str | None = "1") -> Fault:
        """HTTP 429; ``retry_after`` is sent verbatim (seconds or an HTTP-date), ``None`` omits it."""
        return cls(status=429, retry_after=retry_after)

    @classmethod
    def server_error(cls, status: int = 500, echo_authorization: bool = False) -> Fault:
        """HTTP 5xx. ``echo_authorization`` puts the request's Authorization header in the error
        message, like a badly behaved proxy, to check the client scrubs keys from failure details."""
        return cls(status=status, echo_authorization=echo_authorization)

    @classmethod
    def status_code(cls, status: int) -> Fault:
        """Any other status (401, 400, 404 ...) with an OpenAI-style error body."""
        return cls(status=status)

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        """A correct reply that starts only after ``delay_s`` seconds (beyond a client timeout)."""
        return cls(delay_s=delay_s)

    @classmethod
    def invalid_json(cls) -> Fault:
        """HTTP 200 with a JSON content type and a body that is not JSON."""
        return cls(body=b'{"id": "chatcmpl-broken", "choices": [')

    @classmethod
    def no_choices(cls) -> Fault:
        """HTTP 200 with valid JSON that lacks ``choices``."""
        return cls(body=json.dumps({"id": "chatcmpl-x", "object": "chat.completion", "created": 0}).encode())

    @classmethod
    def empty_choices(cls) -> Fault:
        """HTTP 200 with ``choices: []``."""
        return cls(
            body=json.dumps(
                {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}
            ).encode()
        )

    @classmethod
    def empty_content(cls) -> Fault:
        """HTTP 200, well-formed, but the message content is empty."""
        return cls(content="")

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without answering."""
        return cls(disconnect=True)


@dataclass
class RecordedRequest:
    """What the server saw: enough to assert on payloads, keys and timing."""

    index: int
    path: str
    model: str
    messages: list[dict[str, Any]]
    body: dict[str, Any]
    authorization: str | None
    headers: dict[str, str]
    started: float
    finished: float | None = None
    status: int | None = None
    fault: Fault | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so the client's connection pool is exercised
    # Headers and body go out in two writes; with Nagle on, the second waits for the client's
    # delayed ACK (~40 ms per request), which would dwarf the latencies we want to measure.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log (tests and benchmarks stay quiet)."""

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, add=False)

    def _hang(self) -> bool:
        """``hang=True``: hold the request without a byte of reply until the server closes."""
        owner = self.server.owner
        if not owner.hang:
            return False
        with owner._lock:
            owner.held.append(f"{self.command} {self.path}")
        owner._closing.wait()
        self.close_connection = True
        return True

    def do_GET(self) -> None:
        if self._hang():
            return
        if self.path.rstrip("/").endswith("/models"):
            body = {"object": "list", "data": [{"id": "test-model", "object": "model", "owned_by": "test"}]}
            self._send_json(200, json.dumps(body).encode())
        else:
            self._send_error_json(404, "not found")

    def do_POST(self) -> None:
        if self._hang():
            return
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send_error_json(404, f"unknown path {self.path}")
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send_error_json(400, "request body is not JSON")
            return
        record = owner._begin(self.path, body, {k.lower(): v for k, v in self.headers.items()})
        try:
            self._answer(owner, record)
        except (BrokenPipeError, ConnectionResetError, OSError):
            # The client gave up (timeout) or went away: that is a normal test scenario.
            self.close_connection = True
        finally:
            owner._end(record)

    def _answer(self, owner: OpenAITestServer, record: RecordedRequest) -> None:
        fault = owner._next_fault(record)
        record.fault = fault
        delay = owner.latency_s + (fault.delay_s if fault else 0.0)
        if delay > 0 and owner._closing.wait(delay):
            self.close_connection = True
            return
        if fault is not None and fault.disconnect:
            record.status = 0
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.status != 200:
            record.status = fault.status
            message = f"injected HTTP {fault.status}"
            if fault.echo_authorization:
                message += f" (received Authorization: {record.authorization})"
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._send_error_json(fault.status, message, headers)
            return
        record.status = 200
        if fault is not None and fault.body is not None:
            self._send_json(200, fault.body)
            return
        text = (
            fault.content
            if fault is not None and fault.content is not None
            else owner.reply(record.messages, record.model)
        )
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in record.messages)
        completion = {
            "id": f"chatcmpl-{record.index}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": record.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(text.split()),
                "total_tokens": prompt_tokens + len(text.split()),
            },
        }
        self._send_json(200, json.dumps(completion).encode())

    def _send_error_json(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": {"message": message, "type": "test_error", "code": status}}).encode()
        self._send_json(status, body, headers)

    def _send_json(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive handler threads must not block shutdown
    request_queue_size = 512  # the default backlog (5) drops bursts of concurrent connects
    allow_reuse_address = True
    owner: OpenAITestServer


class OpenAITestServer:
    """A threaded OpenAI-compatible server on ``127.0.0.1`` with scriptable replies and faults.

    Use it as a context manager (or call :meth:`start` / :meth:`close`). ``base_url`` is what an
    ``openai`` client needs. All bookkeeping is thread-safe.
    """

    def __init__(
        self,
        reply: ReplyFn | None = None,
        *,
        latency_s: float = 0.0,
        fault_fn: Callable[[RecordedRequest], Fault | None] | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        hang: bool = False,
    ) -> None:
        self.reply: ReplyFn = reply or default_reply
        #: accept connections, read requests, never answer (not even GET /models): a wedged endpoint
        self.hang = hang
        self.held: list[str] = []  # "METHOD path" of every request held by ``hang``
        self.latency_s = latency_s
        self.fault_fn = fault_fn
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        self._counter = itertools.count()
        self._closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> OpenAITestServer:
        """Bind (port 0 = a free port chosen by the OS) and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self._closing.clear()
        httpd = _HTTPServer((self._host, self._port), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, wake sleeping handlers, close open keep-alive sockets and join the thread."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._closing.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public helpers --------------------------------------------------------------------------
    @property
    def port(self) -> int:
        """The bound port (only meaningful once started)."""
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``: pass it as the teacher endpoint's ``base_url``."""
        return f"http://{self._host}:{self.port}/v1"

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each of the next requests (in arrival order) consumes one."""
        with self._lock:
            self._faults.extend(faults)

    def clear_faults(self) -> None:
        """Drop queued faults that were not consumed."""
        with self._lock:
            self._faults.clear()

    def reset_stats(self) -> None:
        """Forget recorded requests and the in-flight maximum (e.g. after a warm-up)."""
        with self._lock:
            self.requests.clear()
            self.max_in_flight = self.in_flight

    @property
    def authorization_headers(self) -> list[str | None]:
        """The ``Authorization`` header of every recorded request, in arrival order."""
        with self._lock:
            return [r.authorization for r in self.requests]

    @property
    def completed(self) -> int:
        """How many requests were answered with HTTP 200."""
        with self._lock:
            return sum(1 for r in self.requests if r.status == 200)

    # -- internals called by the handler ---------------------------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _begin(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> RecordedRequest:
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        with self._lock:
            record = RecordedRequest(
                index=next(self._counter),
                path=path,
                model=str(body.get("model", "")),
                messages=messages,
                body=body,
                authorization=headers.get("authorization"),
                headers=headers,
                started=time.monotonic(),
            )
            self.requests.append(record)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return record

    def _end(self, record: RecordedRequest) -> None:
        with self._lock:
            record.finished = time.monotonic()
            self.in_flight -= 1

    def _next_fault(self, record: RecordedRequest) -> Fault | None:
        if self.fault_fn is not None:
            fault = self.fault_fn(record)
            if fault is not None:
                return fault
        with self._lock:
            return self._faults.popleft() if self._faults else None


def _main() -> None:
    parser = argparse.ArgumentParser(description="Serve a local OpenAI-compatible test endpoint.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every reply")
    args = parser.parse_args()
    with OpenAITestServer(latency_s=args.latency, port=args.port) as server:
        print(f"serving {server.base_url}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    _main()
