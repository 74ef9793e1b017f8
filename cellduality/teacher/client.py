"""Async client for teacher LLMs behind any OpenAI-compatible chat-completions endpoint.

Why this exists rather than calling ``openai`` directly from the SFT script:

* **Our retry policy, observable.** The SDK's own retries are switched off (``max_retries=0``) so that
  every try is counted in the result (``tries``, ``waited_s``), backoff is exponential with full
  jitter, and a server's ``Retry-After`` is honoured (capped) and shared by all requests to that
  endpoint, so a rate-limited provider is not hammered by the other in-flight requests.
* **Failures are data, not exceptions.** A request that cannot be completed ends as a
  :class:`TeacherResult` with ``error`` set to a short machine-readable reason (``http_429``,
  ``http_500``, ``timeout``, ``no_response`` (the endpoint accepts connections but answers
  nothing, not even a liveness check), ``connection_error``, ``malformed_response``, ``empty_content``,
  ``provider_error``, ``missing_api_key``, ``rate_limited`` (asked to wait longer than the ceiling),
  ``unexpected_error``). A long distillation run must not
  die on request 9,000.
* **Reproducible teacher mixtures.** With several endpoints, the teacher for an example is a seeded
  weighted choice keyed by ``(example_id, attempt)``, so a re-run or a resume asks the same teacher.
* **Keys stay in the environment.** An endpoint names the environment *variable* that holds its key;
  the value is read at request time, handed to the SDK for the ``Authorization`` header and
  nowhere else: not in configs, results, reprs, exception messages or anything written to disk.
  Error details coming back from a server are scrubbed of the key before we keep them.
* **Nothing lost on a crash.** :meth:`TeacherClient.run` calls a callback as soon as each request
  finishes, so the caller can append it to an :class:`~cellduality.teacher.store.AttemptStore`.

``openai`` and ``httpx2`` are imported lazily, when the first request is sent, so importing this
module (for the dataclasses) stays cheap.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import openai

__all__ = [
    "MissingAPIKeyError",
    "RetryPolicy",
    "TeacherClient",
    "TeacherConfigError",
    "TeacherEndpoint",
    "TeacherRequest",
    "TeacherResult",
    "choose_teacher",
    "parse_retry_after",
    "redact_url",
    "run_teacher_batch",
]

#: Placeholder sent when an endpoint needs no key (``api_key_env=None``), as vLLM's docs do.
NO_KEY_PLACEHOLDER = "EMPTY"

#: Connections per HTTP pool; larger limits are split over several pools (see ``TeacherClient._start``).
POOL_SHARD_SIZE = 8

#: HTTP statuses worth retrying: rate limits, request timeouts, lock conflicts and server errors.
RETRYABLE_STATUSES = frozenset({408, 409, 429})

OnResult = Callable[["TeacherResult"], "Awaitable[None] | None"]

logger = logging.getLogger(__name__)


class TeacherConfigError(ValueError):
    """A teacher endpoint is configured in a way that cannot work (raised before any request)."""


class MissingAPIKeyError(TeacherConfigError):
    """The environment variable an endpoint names for its key is unset or empty.

    The message names the variable, never a value.
    """


def redact_url(url: str) -> str:
    """Drop user-info and query string from a URL before it is shown or stored.

    Some providers put credentials in the URL (``https://user:key@host`` or ``?api-key=...``); the
    scheme, host, port and path are enough to tell endpoints apart.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


@dataclass(frozen=True)
class TeacherEndpoint:
    """One teacher: an OpenAI-compatible ``base_url`` and a model served there.

    ``api_key_env`` is the *name* of the environment variable holding the key (``None`` for servers
    that need none, e.g. a local vLLM). ``weight`` sets this teacher's share when several are mixed.
    Prices (USD per million tokens) are optional and only feed the cost estimate in results.
    ``timeout_s`` bounds one HTTP try end to end (generous: a long reasoning reply takes minutes).
    A dead endpoint is told apart from a slow one much sooner: ``connect_timeout_s`` bounds the TCP/TLS
    connect, and when no reply has come ``first_byte_timeout_s`` after sending, the endpoint is asked
    ``GET /models`` (any HTTP answer within ``probe_timeout_s`` means alive: the request keeps waiting up
    to ``timeout_s``; none means the endpoint accepts connections but answers nothing, and the request
    fails at once as ``no_response``, as do the other requests to it until a probe succeeds again).
    With the defaults a dead endpoint is reported within about 40 s. ``temperature=None`` leaves the field out and
    ``max_tokens_field="max_completion_tokens"`` renames the length limit: OpenAI's reasoning models
    reject both ``max_tokens`` and a non-default temperature, while most other servers want them.
    """

    base_url: str
    model: str
    weight: float = 1.0
    api_key_env: str | None = "OPENAI_API_KEY"
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None
    temperature: float | None = 0.7
    max_tokens: int = 2048
    timeout_s: float = 600.0
    max_tokens_field: str = "max_tokens"
    connect_timeout_s: float = 10.0
    first_byte_timeout_s: float = 30.0
    probe_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise TeacherConfigError(
                f"teacher base_url must start with http:// or https://, got {redact_url(self.base_url)!r}"
            )
        if not self.model:
            raise TeacherConfigError("teacher model must be a non-empty string")
        if not self.weight >= 0:
            raise TeacherConfigError(f"teacher weight must be >= 0, got {self.weight}")
        for name in ("timeout_s", "connect_timeout_s", "first_byte_timeout_s", "probe_timeout_s"):
            if not getattr(self, name) > 0:
                raise TeacherConfigError(f"teacher {name} must be > 0, got {getattr(self, name)}")
        if self.max_tokens < 1:
            raise TeacherConfigError(f"teacher max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise TeacherConfigError(
                f"max_tokens_field must be 'max_tokens' or 'max_completion_tokens', got {self.max_tokens_field!r}"
            )

    def __repr__(self) -> str:
        # The generated repr would show base_url verbatim; show the redacted form instead.
        return (
            f"TeacherEndpoint(base_url={redact_url(self.base_url)!r}, model={self.model!r}, "
            f"weight={self.weight}, api_key_env={self.api_key_env!r}, temperature={self.temperature}, "
            f"max_tokens={self.max_tokens}, timeout_s={self.timeout_s}, connect_timeout_s={self.connect_timeout_s}, "
            f"first_byte_timeout_s={self.first_byte_timeout_s}, probe_timeout_s={self.probe_timeout_s})"
        )

    __str__ = __repr__

    @property
    def name(self) -> str:
        """``model@redacted-url``: a stable, secret-free label for logs and stores."""
        return f"{self.model}@{redact_url(self.base_url)}"

    def api_key(self) -> str:
        """Read the key from the environment now (so a rotated key is picked up by later requests)."""
        if self.api_key_env is None:
            return NO_KEY_PLACEHOLDER
        value = os.environ.get(self.api_key_env, "")
        if not value:
            raise MissingAPIKeyError(
                f"environment variable {self.api_key_env} is not set; it must hold the API key for "
                f"teacher {self.name} (or set api_key_env=None for a server that needs no key)"
            )
        return value

    def cost_usd(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        """Estimated cost of one completion, or ``None`` when prices or token counts are unknown."""
        if self.price_in_per_mtok is None or self.price_out_per_mtok is None:
            return None
        if prompt_tokens is None or completion_tokens is None:
            return None
        return (prompt_tokens * self.price_in_per_mtok + completion_tokens * self.price_out_per_mtok) / 1e6


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one request before giving up with a structured failure.

    ``max_tries`` counts HTTP tries (1 = no retry). Without ``Retry-After`` the wait before try
    ``n+1`` is uniform in ``[0, min(backoff_max_s, backoff_base_s * 2**(n-1))]`` ("full jitter",
    which spreads retries of many concurrent requests). With ``Retry-After`` (or OpenAI's
    ``retry-after-ms``) the wait is exactly that when it is at most ``retry_after_cap_s``; a server
    that asks for longer (``Retry-After: 3600``: a quota, an hourly limit) is not waited for at all:
    the request ends at once as ``rate_limited``, a verdict instead of hours of capped retries.
    ``max_wait_total_s`` bounds the time one request spends waiting between its tries, whatever the
    reason. A wait of ``note_wait_s`` or more is said on the console (``logging``, once per endpoint
    cool-down), so a run that waits is seen waiting. Malformed or empty replies are retried when
    ``retry_malformed`` (proxies and overloaded servers do return them transiently).
    """

    max_tries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_cap_s: float = 120.0
    retry_malformed: bool = True
    max_wait_total_s: float = 300.0
    note_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_tries < 1:
            raise TeacherConfigError(f"max_tries must be >= 1, got {self.max_tries}")
        if self.backoff_base_s < 0 or self.backoff_max_s < 0 or self.retry_after_cap_s < 0:
            raise TeacherConfigError("backoff and Retry-After bounds must be >= 0")
        if self.max_wait_total_s < 0 or self.note_wait_s < 0:
            raise TeacherConfigError("max_wait_total_s and note_wait_s must be >= 0")

    def backoff_s(self, try_number: int, unit: float) -> float:
        """Full-jitter backoff after failed try ``try_number`` (1-based); ``unit`` is in [0, 1)."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2 ** (try_number - 1)))
        return unit * ceiling


@dataclass(frozen=True)
class TeacherRequest:
    """One chat completion to ask a teacher for.

    ``example_id`` is the deterministic id of the example (see ``docs/contracts.md``); ``attempt``
    numbers the generation attempts for that example (0, 1, ...: a rejected completion is asked
    again with the next attempt, which may go to another teacher). ``metadata`` is passed through to
    the result untouched, for the caller's bookkeeping.
    """

    example_id: str
    messages: Sequence[Mapping[str, Any]]
    attempt: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class TeacherResult:
    """The outcome of one :class:`TeacherRequest` after all its tries.

    ``error`` is ``None`` on success, otherwise a short reason (``http_429``, ``timeout``,
    ``malformed_response``, ...) and ``detail`` a human-readable, key-free explanation.
    ``tries`` counts HTTP tries (not generation attempts: that is ``attempt``); ``latency_s`` is the
    duration of the last try, ``elapsed_s`` the wall time including retries and waits, ``waited_s``
    the time spent sleeping between tries. Token counts come from the server's ``usage``.
    """

    example_id: str
    attempt: int
    teacher: str
    endpoint: str
    text: str | None = None
    finish_reason: str | None = None
    served_model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_s: float = 0.0
    elapsed_s: float = 0.0
    waited_s: float = 0.0
    tries: int = 0
    error: str | None = None
    detail: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when a non-empty completion came back."""
        return self.error is None and self.text is not None


def _unit(seed: int, *parts: object) -> float:
    """A reproducible number in [0, 1) from ``seed`` and ``parts`` (Python's ``hash`` is salted)."""
    key = "\x1f".join([str(seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64


def choose_teacher(
    endpoints: Sequence[TeacherEndpoint], example_id: str, attempt: int = 0, seed: int = 0
) -> TeacherEndpoint:
    """Seeded weighted choice of a teacher for ``(example_id, attempt)``.

    The choice depends only on the seed, the id, the attempt and the endpoint list, never on the
    order in which requests finish, so runs and resumes are reproducible.
    """
    return endpoints[_choose_index(endpoints, example_id, attempt, seed)]


def _choose_index(endpoints: Sequence[TeacherEndpoint], example_id: str, attempt: int, seed: int) -> int:
    if not endpoints:
        raise TeacherConfigError("at least one teacher endpoint is required")
    total = sum(e.weight for e in endpoints)
    if total <= 0:
        raise TeacherConfigError("at least one teacher endpoint needs a weight > 0")
    point = _unit(seed, "teacher", example_id, attempt) * total
    acc = 0.0
    for index, endpoint in enumerate(endpoints):
        acc += endpoint.weight
        if point < acc and endpoint.weight > 0:
            return index
    # float round-off at the top end: the last endpoint with a weight
    return max(i for i, e in enumerate(endpoints) if e.weight > 0)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (delta-seconds or HTTP-date).

    Returns ``None`` when absent or unparseable; never negative.
    """
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    raw_ms = lowered.get("retry-after-ms")
    if raw_ms is not None:
        try:
            return max(0.0, float(raw_ms) / 1000.0)
        except ValueError:
            pass
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class _NotResponding(Exception):
    """The endpoint did not answer a liveness probe (see ``TeacherEndpoint``)."""


@dataclass
class _Failure:
    reason: str
    detail: str
    retry_after_s: float | None = None


class TeacherClient:
    """Send chat completions to one or more teachers with a shared concurrency limit.

    Use it as an async context manager (it owns one HTTP connection pool sized to ``concurrency``)::

        async with TeacherClient([endpoint], concurrency=32) as client:
            results = await client.run(requests, on_result=store_append)

    ``concurrency`` bounds the HTTP requests in flight across all endpoints; requests waiting for a
    backoff do not hold a slot. ``seed`` fixes the teacher mixture and the retry jitter.
    """

    def __init__(
        self,
        endpoints: TeacherEndpoint | Sequence[TeacherEndpoint],
        *,
        concurrency: int = 16,
        retry: RetryPolicy | None = None,
        seed: int = 0,
        on_retry: Callable[[TeacherResult, str, float], None] | None = None,
    ) -> None:
        self.endpoints: tuple[TeacherEndpoint, ...] = (
            (endpoints,) if isinstance(endpoints, TeacherEndpoint) else tuple(endpoints)
        )
        if not self.endpoints:
            raise TeacherConfigError("at least one teacher endpoint is required")
        if sum(e.weight for e in self.endpoints) <= 0:
            raise TeacherConfigError("at least one teacher endpoint needs a weight > 0")
        if concurrency < 1:
            raise TeacherConfigError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.seed = seed
        self._slots: asyncio.Queue[int] | None = None
        self._http: list[Any] = []
        self._sdk: dict[tuple[int, int], openai.AsyncOpenAI] = {}
        self._not_before: dict[int, float] = {}
        #: called as ``on_retry(result, reason, wait_s)`` before each retry (progress lines count them)
        self.on_retry = on_retry
        self.retries = 0
        self._probe_http: Any = None
        self._probe_sdk: dict[int, openai.AsyncOpenAI] = {}
        self._probe_task: dict[int, asyncio.Task[bool]] = {}
        self._probe_at: dict[int, float] = {}
        self._dead: dict[int, str] = {}  # endpoint index -> why it is taken as not responding
        self._limited: dict[int, tuple[float, str]] = {}  # endpoint index -> (asked to wait until, why)
        self._noted_until: dict[int, float] = {}  # endpoint index -> end of the last wait said on the console

    def __repr__(self) -> str:
        names = ", ".join(e.name for e in self.endpoints)
        return (
            f"TeacherClient([{names}], concurrency={self.concurrency}, retry={self.retry}, seed={self.seed})"
        )

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> TeacherClient:
        self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _start(self) -> None:
        """Create the concurrency slots, the HTTP connection pools and the SDK clients.

        Done lazily inside the running loop: async HTTP clients belong to the loop that uses them.

        The concurrency limit is a queue of ``concurrency`` slot tokens (a semaphore that also says
        *which* pool to use). The connections are split into pools of at most
        ``POOL_SHARD_SIZE``, because httpcore scans every connection of a pool on each request:
        with one pool of 32 that scan was a fifth of the client's CPU per request (2.0 ms at
        concurrency 8, 2.45 at 32, 3.0 at 128). Each pool has exactly as many connections as it has
        tokens, so a request never waits inside a pool (where it would eat into its timeout), and
        the connections stay alive between requests.
        """
        if self._http:
            return
        import httpx2
        import openai

        n_pools = -(-self.concurrency // POOL_SHARD_SIZE)
        sizes = [len(range(p, self.concurrency, n_pools)) for p in range(n_pools)]
        self._slots = asyncio.Queue()
        for token in range(self.concurrency):
            self._slots.put_nowait(token % n_pools)
        for pool, size in enumerate(sizes):
            http = openai.DefaultAsyncHttpxClient(
                limits=httpx2.Limits(max_connections=size, max_keepalive_connections=size)
            )
            self._http.append(http)
            for index, endpoint in enumerate(self.endpoints):
                self._sdk[index, pool] = openai.AsyncOpenAI(
                    base_url=endpoint.base_url,
                    api_key=self._key_provider(endpoint),
                    max_retries=0,
                    timeout=httpx2.Timeout(endpoint.timeout_s, connect=endpoint.connect_timeout_s),
                    http_client=http,
                    default_headers=_account_headers(endpoint.base_url),
                )
        # Liveness probes get their own small pool: the request pools are full exactly when one is needed.
        self._probe_http = openai.DefaultAsyncHttpxClient(
            limits=httpx2.Limits(max_connections=len(self.endpoints), max_keepalive_connections=0)
        )
        for index, endpoint in enumerate(self.endpoints):
            self._probe_sdk[index] = openai.AsyncOpenAI(
                base_url=endpoint.base_url,
                api_key=self._key_provider(endpoint),
                max_retries=0,
                timeout=httpx2.Timeout(endpoint.probe_timeout_s, connect=endpoint.connect_timeout_s),
                http_client=self._probe_http,
                default_headers=_account_headers(endpoint.base_url),
            )

    @staticmethod
    def _key_provider(endpoint: TeacherEndpoint) -> Callable[[], Awaitable[str]]:
        """The SDK asks for the key on every request, so a key rotated in the environment is used."""

        async def provider() -> str:
            return endpoint.api_key()

        return provider

    async def aclose(self) -> None:
        """Close the HTTP connection pools (idempotent)."""
        pools, self._http = self._http, []
        self._sdk.clear()
        for task in self._probe_task.values():
            task.cancel()
        self._probe_task.clear()
        self._probe_sdk.clear()
        if self._probe_http is not None:
            pools.append(self._probe_http)
            self._probe_http = None
        for http in pools:
            await http.aclose()

    # -- configuration checks --------------------------------------------------------------------
    def check_credentials(self) -> None:
        """Raise :class:`MissingAPIKeyError` naming every unset key variable (before spending money)."""
        missing = sorted(
            {
                e.api_key_env
                for e in self.endpoints
                if e.api_key_env and e.weight > 0 and not os.environ.get(e.api_key_env)
            }
        )
        if missing:
            raise MissingAPIKeyError(
                "environment variable(s) " + ", ".join(missing) + " must hold the teacher API key(s)"
            )

    def choose(self, example_id: str, attempt: int = 0) -> TeacherEndpoint:
        """The teacher that ``(example_id, attempt)`` is sent to (see :func:`choose_teacher`)."""
        return choose_teacher(self.endpoints, example_id, attempt, self.seed)

    # -- many requests ---------------------------------------------------------------------------
    async def run(
        self,
        requests: Iterable[TeacherRequest],
        on_result: OnResult | None = None,
        *,
        progress: bool = False,
        description: str = "teacher",
        total: int | None = None,
        collect: bool = True,
        callback_thread: bool = True,
    ) -> list[TeacherResult]:
        """Complete many requests concurrently; call ``on_result`` as each one finishes.

        ``on_result`` is called once per result, in completion order, one call at a time, right
        after the request finishes, so an append to disk there survives a later crash. A sync
        callback runs on a helper thread (``callback_thread=False`` runs it in the loop thread) so
        that a slow fsync does not stall the requests in flight; an async callback is awaited. If it
        raises, the batch is cancelled and the exception propagates (unsaved results must not be
        silently dropped). ``requests`` may be a lazy iterable; results come back in input order
        (``collect=False`` keeps none in memory). Raises :class:`MissingAPIKeyError` before sending
        anything if a key variable is unset.
        """
        return await _run_batch(
            self, requests, on_result, progress, description, total, collect, callback_thread
        )

    # -- one request -----------------------------------------------------------------------------
    async def complete(self, request: TeacherRequest) -> TeacherResult:
        """Ask the chosen teacher, retrying per the policy. Never raises (except on cancellation)."""
        self._start()
        index = _choose_index(self.endpoints, request.example_id, request.attempt, self.seed)
        endpoint = self.endpoints[index]
        result = TeacherResult(
            example_id=request.example_id,
            attempt=request.attempt,
            teacher=endpoint.model,
            endpoint=redact_url(endpoint.base_url),
            metadata=request.metadata,
        )
        started = time.monotonic()
        try:
            while True:
                result.tries += 1
                failure = await self._try_once(index, endpoint, request, result)
                if failure is None:
                    result.error = result.detail = None
                    break
                result.error, result.detail = failure.reason, failure.detail
                asked = failure.retry_after_s
                if asked is not None and asked > self.retry.retry_after_cap_s:
                    # A verdict now: the limit will not lift within a wait we are willing to make.
                    result.error = "rate_limited"
                    result.detail = (
                        f"{endpoint.name} answered {failure.reason.replace('_', ' ')} asking to wait "
                        f"{asked:g} s (Retry-After), more than the {self.retry.retry_after_cap_s:g} s one wait "
                        "may take (--max-retry-wait): a quota or rate limit; run again once it has lifted"
                    )
                    # the other requests to this endpoint get the same verdict without being sent
                    self._limited[index] = (time.monotonic() + asked, result.detail)
                    break
                if result.tries >= self.retry.max_tries or not self._retryable(failure.reason):
                    break
                if asked is not None:
                    wait = asked
                else:
                    unit = _unit(self.seed, "jitter", request.example_id, request.attempt, result.tries)
                    wait = self.retry.backoff_s(result.tries, unit)
                if result.waited_s + wait > self.retry.max_wait_total_s:
                    result.detail = (
                        f"{result.detail}; gave up after {result.tries} tries: one more wait ({wait:g} s) would "
                        f"pass the {self.retry.max_wait_total_s:g} s a request may spend waiting (--max-retry-total)"
                    )
                    break
                if asked is not None:
                    # Everyone talking to this endpoint waits: the limit is the provider's, not ours.
                    self._not_before[index] = max(self._not_before.get(index, 0.0), time.monotonic() + wait)
                self._note_wait(index, endpoint, failure.reason, wait, asked is not None)
                result.waited_s += wait
                self.retries += 1
                if self.on_retry is not None:
                    self.on_retry(result, failure.reason, wait)
                await asyncio.sleep(wait)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an SDK surprise must not kill a long run
            result.error = "unexpected_error"
            result.detail = _scrub(f"{type(exc).__name__}: {exc}", endpoint)
        result.elapsed_s = time.monotonic() - started
        return result

    def _note_wait(
        self, index: int, endpoint: TeacherEndpoint, reason: str, wait: float, asked: bool
    ) -> None:
        """Say on the console that requests wait ``wait`` s, once per endpoint cool-down (not per request)."""
        if wait < self.retry.note_wait_s:
            return
        until = time.monotonic() + wait
        if until <= self._noted_until.get(index, 0.0) + 1.0:
            return  # this cool-down was said already
        self._noted_until[index] = until
        why = "as the server asks (Retry-After)" if asked else "before retrying"
        logger.warning(
            "teacher %s: %s, waiting %.3g s %s; at most %g s per wait and %g s per request (--max-retry-wait, "
            "--max-retry-total)",
            endpoint.name,
            reason,
            wait,
            why,
            self.retry.retry_after_cap_s,
            self.retry.max_wait_total_s,
        )

    async def _post(self, index: int, pool: int, endpoint: TeacherEndpoint, request: TeacherRequest) -> bytes:
        """POST one chat completion through the SDK; return the body of a 2xx reply.

        ``client.post(..., cast_to=httpx2.Response)`` is the SDK's documented route for raw requests:
        the same auth, headers, timeouts and error classes (non-2xx raise ``APIStatusError``) as
        ``chat.completions.create``, without the type-driven transform of every message and the
        pydantic model of the reply. Those two cost about half of the client's CPU per request
        (measured: 2.25 -> 1.4 ms), and parsing the JSON ourselves makes "malformed" our decision.
        """
        import httpx2

        body: dict[str, Any] = {
            "model": endpoint.model,
            "messages": [dict(m) for m in request.messages],
            endpoint.max_tokens_field: endpoint.max_tokens,
        }
        if endpoint.temperature is not None:
            body["temperature"] = endpoint.temperature
        response = await self._sdk[index, pool].post(
            "/chat/completions",
            cast_to=httpx2.Response,
            body=body,
            options={"security": {"bearer_auth": True}},  # as create() does: never other credentials
        )
        return response.content

    async def _reply(
        self, index: int, pool: int, endpoint: TeacherEndpoint, request: TeacherRequest
    ) -> bytes:
        """The reply body; a liveness probe after ``first_byte_timeout_s`` tells dead from slow.

        The SDK's timeouts bound the connect and each read; the outer bound ``timeout_s`` also stops a
        server that trickles bytes.
        """
        post = asyncio.ensure_future(self._post(index, pool, endpoint, request))
        try:
            first = endpoint.first_byte_timeout_s
            if first >= endpoint.timeout_s:  # no liveness check before the total timeout
                first = endpoint.timeout_s + 1.0
            done, _ = await asyncio.wait({post}, timeout=first)
            if not done and first > endpoint.timeout_s:
                raise asyncio.TimeoutError
            if not done:
                if not await self._alive(index, endpoint, fresh=True):
                    raise _NotResponding(self._dead[index])
                done, _ = await asyncio.wait({post}, timeout=max(0.0, endpoint.timeout_s - first) + 1.0)
                if not done:
                    raise asyncio.TimeoutError
            body = post.result()
        finally:
            if not post.done():
                post.cancel()
                await asyncio.gather(post, return_exceptions=True)
        self._dead.pop(index, None)
        return body

    async def _alive(self, index: int, endpoint: TeacherEndpoint, fresh: bool = False) -> bool:
        """Whether the endpoint answers ``GET /models`` (any HTTP status) within ``probe_timeout_s``.

        One probe per endpoint at a time, shared by every request that asks; a verdict is reused for a
        few seconds (``fresh`` asks for one newer than the request's own wait). A failed probe marks the
        endpoint not responding, which later requests see without waiting ``first_byte_timeout_s``.
        """
        task = self._probe_task.get(index)
        recent = time.monotonic() - self._probe_at.get(index, -1e9) < (
            1.0 if fresh else endpoint.probe_timeout_s
        )
        if task is None or (task.done() and not recent):
            task = asyncio.ensure_future(self._probe(index, endpoint))
            self._probe_task[index] = task
        alive = await asyncio.shield(task)
        if alive:
            self._dead.pop(index, None)
        return alive

    async def _probe(self, index: int, endpoint: TeacherEndpoint) -> bool:
        import httpx2
        import openai

        try:
            await asyncio.wait_for(
                self._probe_sdk[index].get("/models", cast_to=httpx2.Response), endpoint.probe_timeout_s + 1.0
            )
            return True
        except openai.APIStatusError:  # 401, 404 ...: something answered
            return True
        except (openai.APITimeoutError, asyncio.TimeoutError):
            got = f"no answer within {endpoint.probe_timeout_s:g} s either"
        except openai.APIConnectionError:
            got = "its connection refused or dropped"
        finally:
            self._probe_at[index] = time.monotonic()
        self._dead[index] = (
            f"{redact_url(endpoint.base_url)} accepted the connection but sent no reply within "
            f"{endpoint.first_byte_timeout_s:g} s, and a liveness check (GET /models) got {got}: the "
            "endpoint is not responding"
        )
        return False

    def _retryable(self, reason: str) -> bool:
        if reason in ("timeout", "connection_error", "provider_error", "no_response"):
            return True
        if reason in ("malformed_response", "empty_content"):
            return self.retry.retry_malformed
        if reason.startswith("http_"):
            status = int(reason[5:])
            return status in RETRYABLE_STATUSES or status >= 500
        return False

    async def _try_once(
        self, index: int, endpoint: TeacherEndpoint, request: TeacherRequest, result: TeacherResult
    ) -> _Failure | None:
        """One HTTP try; fills ``result`` on success, returns the failure otherwise."""
        import openai

        try:
            endpoint.api_key()
        except MissingAPIKeyError as exc:
            return _Failure("missing_api_key", str(exc))

        assert self._slots is not None
        while True:
            # Honour a cool-down that an endpoint's Retry-After imposed on every request to it,
            # also one that began while this request was queued for a slot (no slot held asleep).
            delay = self._not_before.get(index, 0.0) - time.monotonic()
            if delay > 0:
                result.waited_s += delay
                await asyncio.sleep(delay)
            pool = await self._slots.get()  # the concurrency limit: one token per request in flight
            if self._not_before.get(index, 0.0) <= time.monotonic():
                break
            self._slots.put_nowait(pool)
        try:
            # An endpoint found not responding (also while this request queued for a slot) is not
            # sent to again until a liveness check says it is back.
            if index in self._dead and not await self._alive(index, endpoint):
                return _Failure("no_response", self._dead[index])
            limited = self._limited.get(index)
            if limited is not None and time.monotonic() < limited[0]:
                return _Failure("rate_limited", limited[1])
            t0 = time.monotonic()
            try:
                raw = await self._reply(index, pool, endpoint, request)
            except _NotResponding as exc:
                return _Failure("no_response", str(exc))
            except MissingAPIKeyError as exc:  # the variable vanished between the check and the send
                return _Failure("missing_api_key", str(exc))
            except (openai.APITimeoutError, asyncio.TimeoutError):
                return _Failure("timeout", f"no reply within {endpoint.timeout_s:g} s")
            except openai.APIConnectionError as exc:
                return _Failure("connection_error", _scrub(f"{exc} ({exc.__cause__!r})", endpoint))
            except openai.APIStatusError as exc:
                headers = dict(exc.response.headers) if exc.response is not None else None
                return _Failure(
                    f"http_{exc.status_code}",
                    _scrub(str(exc), endpoint)[:500],
                    parse_retry_after(headers) if exc.status_code in (429, 503) else None,
                )
            finally:
                result.latency_s = time.monotonic() - t0
        finally:
            self._slots.put_nowait(pool)
        return _read_completion(raw, endpoint, result)


def _account_headers(base_url: str) -> dict[str, Any]:
    """Headers that stop the SDK from sending ``OPENAI_ORG_ID`` / ``OPENAI_PROJECT_ID`` elsewhere.

    The SDK adds ``OpenAI-Organization`` / ``OpenAI-Project`` from the environment to every request,
    whatever the host; a third-party or self-hosted teacher has no business seeing those account
    identifiers, so they are omitted unless the endpoint is OpenAI's own API.
    """
    import openai

    host = (urlsplit(base_url).hostname or "").lower()
    if host == "openai.com" or host.endswith(".openai.com"):
        return {}
    return {"OpenAI-Organization": openai.omit, "OpenAI-Project": openai.omit}


def _read_completion(raw: bytes, endpoint: TeacherEndpoint, result: TeacherResult) -> _Failure | None:
    """Pull text, finish reason and usage out of a reply body, or say why it is unusable.

    Lenient where providers differ harmlessly (extra fields, content given as a list of text
    parts, no usage), strict where the reply cannot be used (not JSON, no choices, no text).
    """
    try:
        data = json.loads(raw)
    except ValueError:
        if raw.lstrip()[:1] == b"<":  # a proxy's or login wall's page, answered with HTTP 200
            detail = f"reply is an HTML page, not a chat completion (a proxy or a login page?): {raw[:120]!r}"
        else:
            detail = f"reply body is not JSON: {raw[:120]!r}"
        return _Failure("malformed_response", _scrub(detail, endpoint))
    if not isinstance(data, dict):
        return _Failure("malformed_response", f"reply body is a JSON {type(data).__name__}, not an object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        error = data.get("error")
        if error:  # some gateways answer 200 with an error object (an upstream failure)
            message = error.get("message", error) if isinstance(error, dict) else error
            return _Failure("provider_error", _scrub(f"HTTP 200 with error: {message}", endpoint)[:500])
        return _Failure("malformed_response", "reply has no choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        return _Failure("malformed_response", "first choice has no message")
    result.finish_reason = _as_str(choice.get("finish_reason"))
    result.served_model = _as_str(data.get("model"))
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    result.prompt_tokens = _as_int(usage.get("prompt_tokens"))
    result.completion_tokens = _as_int(usage.get("completion_tokens"))
    result.cost_usd = endpoint.cost_usd(result.prompt_tokens, result.completion_tokens)
    text = message.get("content")
    if isinstance(text, list):  # content parts: [{"type": "text", "text": ...}, ...]
        text = "".join(
            p.get("text", "") for p in text if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    if not isinstance(text, str) or not text.strip():
        return _Failure("empty_content", f"reply content is empty (finish_reason={result.finish_reason})")
    result.text = text
    return None


def _as_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _scrub(text: str, endpoint: TeacherEndpoint) -> str:
    """Remove the endpoint's key from a message (a proxy may echo request headers in its errors)."""
    if endpoint.api_key_env:
        secret = os.environ.get(endpoint.api_key_env, "")
        if len(secret) >= 6:
            text = text.replace(secret, "***")
    return text


# -- batches -------------------------------------------------------------------------------------


async def _run_batch(
    client: TeacherClient,
    requests: Iterable[TeacherRequest],
    on_result: OnResult | None,
    progress: bool,
    description: str,
    total: int | None,
    collect: bool,
    callback_thread: bool = True,
) -> list[TeacherResult]:
    from tqdm.auto import tqdm

    client.check_credentials()
    client._start()
    if total is None and isinstance(requests, Sized):
        total = len(requests)
    iterator = iter(requests)
    # A bounded window of tasks: a generator of 10^6 requests must not become 10^6 tasks at once.
    # Finished tasks report through a queue (O(1) per completion, unlike asyncio.wait over the set).
    window = max(2 * client.concurrency, client.concurrency + 8)
    finished: asyncio.Queue[tuple[int, TeacherResult | BaseException]] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    slots: list[TeacherResult | None] = []
    submitted = in_flight = 0
    exhausted = False
    n_ok = n_failed = tokens = 0
    cost = 0.0
    # A sync callback (typically an fsync'd store append, ~5 ms on a real disk) runs on one helper
    # thread, one result at a time and in order, so the event loop keeps the HTTP requests moving.
    loop = asyncio.get_running_loop()
    is_async_callback = inspect.iscoroutinefunction(on_result) or inspect.iscoroutinefunction(
        getattr(on_result, "__call__", None)  # noqa: B004 - async callable objects
    )
    executor = (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-callback")
        if on_result is not None and callback_thread and not is_async_callback
        else None
    )

    async def work(position: int, request: TeacherRequest) -> None:
        try:
            finished.put_nowait((position, await client.complete(request)))
        except Exception as exc:  # complete() does not raise; never leave the loop below waiting
            finished.put_nowait((position, exc))

    bar = tqdm(total=total, desc=description, unit="req", disable=not progress, dynamic_ncols=True)
    try:
        while True:
            while not exhausted and in_flight < window:
                try:
                    request = next(iterator)
                except StopIteration:
                    exhausted = True
                    break
                if collect:
                    slots.append(None)
                task = asyncio.ensure_future(work(submitted, request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                submitted += 1
                in_flight += 1
            if in_flight == 0:
                break
            position, outcome = await finished.get()
            in_flight -= 1
            if isinstance(outcome, BaseException):
                raise outcome
            result = outcome
            if collect:
                slots[position] = result
            if result.ok:
                n_ok += 1
            else:
                n_failed += 1
            tokens += (result.prompt_tokens or 0) + (result.completion_tokens or 0)
            cost += result.cost_usd or 0.0
            if on_result is not None:
                if executor is not None:
                    ret = await loop.run_in_executor(executor, on_result, result)
                else:
                    ret = on_result(result)
                if inspect.isawaitable(ret):
                    await ret
            if progress:
                bar.update(1)
                postfix = {"ok": n_ok, "failed": n_failed, "tokens": tokens}
                if client.retries:
                    postfix["retries"] = client.retries
                if cost:
                    postfix["usd"] = f"{cost:.2f}"
                bar.set_postfix(postfix, refresh=False)
    finally:
        pending = list(tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if executor is not None:
            executor.shutdown(wait=True)  # a callback that is running finishes its write
        bar.close()
    return [r for r in slots if r is not None]


async def _run_in_client(
    client: TeacherClient,
    requests: Iterable[TeacherRequest],
    on_result: OnResult | None,
    progress: bool,
    description: str,
    total: int | None,
    collect: bool,
    callback_thread: bool,
) -> list[TeacherResult]:
    async with client:
        return await _run_batch(
            client, requests, on_result, progress, description, total, collect, callback_thread
        )


def run_teacher_batch(
    endpoints: TeacherEndpoint | Sequence[TeacherEndpoint],
    requests: Iterable[TeacherRequest],
    on_result: OnResult | None = None,
    *,
    concurrency: int = 16,
    retry: RetryPolicy | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "teacher",
    total: int | None = None,
    collect: bool = True,
    callback_thread: bool = True,
) -> list[TeacherResult]:
    """Synchronous entry point: run a batch with a progress bar, calling ``on_result`` per item.

    See :meth:`TeacherClient.run` for the callback's contract. Works from plain scripts and from
    inside a running event loop (e.g. Jupyter), where it runs the batch on a helper thread with its
    own loop.
    """
    client = TeacherClient(endpoints, concurrency=concurrency, retry=retry, seed=seed)
    coro_args = (client, requests, on_result, progress, description, total, collect, callback_thread)
    return run_coroutine(_run_in_client(*coro_args), name="teacher-batch")


def run_coroutine(coro: Any, name: str = "cellduality-async") -> Any:
    """``asyncio.run``, also from inside a running event loop (Jupyter), where it uses a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
