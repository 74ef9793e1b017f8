"""The teacher client through the real ``openai`` SDK against a real local HTTP server.

Nothing here reaches the network: every endpoint is ``127.0.0.1`` (see ``tests/openai_server.py``).
Backoff bases are tiny so the whole file runs in a few seconds.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import threading
import time
from collections import Counter

import pytest

from cellduality.teacher import (
    AttemptStore,
    MissingAPIKeyError,
    RetryPolicy,
    TeacherClient,
    TeacherConfigError,
    TeacherEndpoint,
    TeacherRequest,
    choose_teacher,
    parse_retry_after,
    run_teacher_batch,
)

try:
    from openai_server import Fault, OpenAITestServer
except ModuleNotFoundError:  # tests/ became a package
    from tests.openai_server import Fault, OpenAITestServer

SECRET = "sk-test-DO-NOT-LEAK-7f3a9c1e"
KEY_ENV = "CELLDUALITY_TEST_TEACHER_KEY"
FAST = RetryPolicy(max_tries=4, backoff_base_s=0.01, backoff_max_s=0.05, retry_after_cap_s=2.0)
MESSAGES = [{"role": "system", "content": "You are a biologist."}, {"role": "user", "content": "CD3E CD3D"}]


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


@pytest.fixture
def server():
    with OpenAITestServer() as srv:
        yield srv


def endpoint(srv: OpenAITestServer, model: str = "teacher-a", **kw) -> TeacherEndpoint:
    kw.setdefault("timeout_s", 2.0)
    return TeacherEndpoint(base_url=srv.base_url, model=model, api_key_env=KEY_ENV, **kw)


def one(srv: OpenAITestServer, retry: RetryPolicy = FAST, example_id: str = "ex/0", **kw):
    [result] = run_teacher_batch(
        endpoint(srv, **kw), [TeacherRequest(example_id, MESSAGES)], retry=retry, progress=False
    )
    return result


def test_roundtrip_text_usage_cost_and_payload(key: str) -> None:
    def reply(messages, model):
        return f"<think>T cell markers</think><answer>{model}:{messages[-1]['content']}</answer>"

    with OpenAITestServer(reply=reply) as srv:
        result = one(srv, price_in_per_mtok=2.0, price_out_per_mtok=8.0, temperature=0.3, max_tokens=64)
        assert result.ok and result.error is None and result.tries == 1
        assert result.text == "<think>T cell markers</think><answer>teacher-a:CD3E CD3D</answer>"
        assert (result.teacher, result.served_model, result.finish_reason) == (
            "teacher-a",
            "teacher-a",
            "stop",
        )
        assert result.prompt_tokens == 6 and result.completion_tokens == 4
        assert result.cost_usd == pytest.approx((6 * 2.0 + 4 * 8.0) / 1e6)
        [seen] = srv.requests
        assert seen.model == "teacher-a" and seen.messages == MESSAGES
        assert seen.body["temperature"] == 0.3 and seen.body["max_tokens"] == 64
        assert seen.authorization == f"Bearer {key}"


def test_reasoning_model_request_shape(key: str, server: OpenAITestServer) -> None:
    assert one(server, temperature=None, max_tokens_field="max_completion_tokens", max_tokens=99).ok
    body = server.requests[0].body
    assert body["max_completion_tokens"] == 99 and "max_tokens" not in body and "temperature" not in body
    with pytest.raises(TeacherConfigError):
        endpoint(server, max_tokens_field="max_length")


def test_429_honours_retry_after(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.rate_limit(retry_after="0.4"))
    result = one(server)
    assert result.ok and result.tries == 2
    first, second = server.requests
    gap = second.started - first.finished
    # the retry came after the provider's pause (the tiny backoff base, 0.01 s, would have retried at once),
    # and the client waited that pause once: its own account, not a wall-clock bound that fails under load
    assert gap >= 0.38, gap
    assert result.waited_s == pytest.approx(0.4, abs=0.05)


def test_retry_after_pauses_every_request_to_that_endpoint(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.rate_limit(retry_after="0.4"))
    requests = [TeacherRequest(f"ex/{i}", MESSAGES) for i in range(3)]
    results = run_teacher_batch(endpoint(server), requests, concurrency=1, retry=FAST, progress=False)
    assert all(r.ok for r in results)
    first, *rest = server.requests
    assert first.status == 429 and len(rest) == 3
    # The queued requests did not go ahead while the provider asked everyone to wait.
    assert min(r.started for r in rest) - first.finished >= 0.38


def test_retry_after_beyond_the_ceiling_is_a_verdict_not_a_wait(key: str, server: OpenAITestServer) -> None:
    """Retry-After: 3600 with a 0.2 s ceiling: no wait and no retry, the request ends as rate_limited at once
    (before, it waited the ceiling and retried up to max_tries: minutes per request with the defaults)."""
    server.inject(Fault.rate_limit(retry_after="3600"))
    retry = RetryPolicy(max_tries=5, backoff_base_s=0.01, retry_after_cap_s=0.2)
    result = one(server, retry=retry)
    assert not result.ok and result.error == "rate_limited" and result.tries == 1
    assert result.waited_s == 0 and len(server.requests) == 1
    assert "asking to wait 3600 s (Retry-After), more than the 0.2 s" in result.detail


def test_waits_of_one_request_have_a_ceiling(key: str) -> None:
    """Each 429 asks for 0.3 s (under the 1 s ceiling), but together they may not pass 0.5 s: two tries."""
    retry = RetryPolicy(max_tries=5, backoff_base_s=0.01, retry_after_cap_s=1.0, max_wait_total_s=0.5)
    with OpenAITestServer(fault_fn=lambda request: Fault.rate_limit(retry_after="0.3")) as srv:
        result = one(srv, retry=retry)
        assert len(srv.requests) == 2
    assert not result.ok and result.error == "http_429" and result.tries == 2
    assert result.waited_s == pytest.approx(0.3)
    assert "gave up after 2 tries: one more wait (0.3 s) would pass the 0.5 s" in result.detail


def test_a_long_wait_is_said_once_per_cool_down(key: str, server: OpenAITestServer, caplog) -> None:
    """Three requests share one Retry-After cool-down: one console note, naming the ceilings."""
    server.inject(Fault.rate_limit(retry_after="0.3"))
    retry = RetryPolicy(max_tries=3, backoff_base_s=0.01, retry_after_cap_s=1.0, note_wait_s=0.1)
    requests = [TeacherRequest(f"ex/{i}", MESSAGES) for i in range(3)]
    with caplog.at_level("WARNING", logger="cellduality.teacher.client"):
        results = run_teacher_batch(endpoint(server), requests, concurrency=1, retry=retry, progress=False)
    assert all(r.ok for r in results)
    notes = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(notes) == 1, notes
    assert "http_429, waiting 0.3 s as the server asks (Retry-After)" in notes[0]
    assert "at most 1 s per wait and 300 s per request" in notes[0]


def test_retry_after_http_date_in_the_past_means_now(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.rate_limit(retry_after=email.utils.formatdate(time.time() - 60, usegmt=True)))
    result = one(server)
    assert result.ok and result.tries == 2 and result.waited_s < 0.05


def test_parse_retry_after_forms() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after({"Retry-After": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    http_date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": http_date}, now=now) == pytest.approx(30.0)
    assert parse_retry_after({"Retry-After": "-4"}) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


def test_500_then_success(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.server_error(500))
    result = one(server)
    assert result.ok and result.tries == 2 and result.error is None
    assert 0.0 <= result.waited_s <= FAST.backoff_base_s  # full jitter: uniform in [0, base]
    assert [r.status for r in server.requests] == [500, 200]


def test_gives_up_after_max_tries_with_reason(key: str) -> None:
    with OpenAITestServer(fault_fn=lambda req: Fault.server_error(503)) as srv:
        result = one(srv)
        assert not result.ok and result.text is None
        assert result.error == "http_503" and result.tries == FAST.max_tries
        assert len(srv.requests) == FAST.max_tries


def test_client_errors_are_not_retried(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.status_code(401))
    result = one(server)
    assert result.error == "http_401" and result.tries == 1 and len(server.requests) == 1


def test_timeout_is_retried_then_reported(key: str) -> None:
    # the server would answer after a minute (closing it ends the wait, so the test does not take it)
    with OpenAITestServer(fault_fn=lambda req: Fault.slow(60.0)) as srv:
        result = one(srv, retry=RetryPolicy(max_tries=2, backoff_base_s=0.01), timeout_s=0.3)
        assert result.error == "timeout" and result.tries == 2 and result.text is None
        # order, not a clock bound: both tries were given up while the server was still holding them
        assert len(srv.requests) == 2 and all(r.finished is None for r in srv.requests)


def test_timeout_then_success(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.slow(5.0))
    result = one(server, timeout_s=0.3)
    assert result.ok and result.tries == 2


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (Fault.invalid_json(), "malformed_response"),
        (Fault.no_choices(), "malformed_response"),
        (Fault.empty_choices(), "malformed_response"),
        (Fault.empty_content(), "empty_content"),
    ],
)
def test_malformed_bodies_end_as_failures(key: str, fault: Fault, reason: str) -> None:
    with OpenAITestServer(fault_fn=lambda req: fault) as srv:
        result = one(srv, retry=RetryPolicy(max_tries=2, backoff_base_s=0.01))
        assert result.error == reason and result.tries == 2 and not result.ok
        assert result.detail


def test_lenient_reply_shapes(key: str) -> None:
    parts = {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": [
            {"type": "text", "text": "<think>a</think>"}, {"type": "text", "text": "<answer>b</answer>"}
        ]}, "finish_reason": "length"}],
    }  # fmt: skip
    with OpenAITestServer(fault_fn=lambda req: Fault(body=json.dumps(parts).encode())) as srv:
        result = one(srv)
        assert result.ok and result.text == "<think>a</think><answer>b</answer>"
        assert result.finish_reason == "length" and result.prompt_tokens is None and result.cost_usd is None


def test_http_200_with_error_object_is_a_provider_error(key: str) -> None:
    body = json.dumps({"error": {"message": "upstream overloaded", "code": 502}}).encode()
    with OpenAITestServer(fault_fn=lambda req: Fault(body=body)) as srv:
        result = one(srv, retry=RetryPolicy(max_tries=2, backoff_base_s=0.01))
        assert result.error == "provider_error" and result.tries == 2
        assert "upstream overloaded" in (result.detail or "")


def test_malformed_once_then_success(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.invalid_json())
    assert one(server).ok


def test_malformed_not_retried_when_disabled(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.no_choices())
    result = one(server, retry=RetryPolicy(max_tries=3, retry_malformed=False))
    assert result.error == "malformed_response" and result.tries == 1


def test_connection_errors(key: str, server: OpenAITestServer) -> None:
    server.inject(Fault.drop())
    assert one(server).ok  # dropped once, then answered
    base_url = server.base_url
    server.close()  # nothing listens there any more
    ep = TeacherEndpoint(base_url=base_url, model="m", api_key_env=KEY_ENV, timeout_s=1.0)
    [result] = run_teacher_batch(
        ep,
        [TeacherRequest("x", MESSAGES)],
        retry=RetryPolicy(max_tries=2, backoff_base_s=0.01),
        progress=False,
    )
    assert result.error == "connection_error" and result.tries == 2


def test_concurrency_limit_holds(key: str) -> None:
    with OpenAITestServer(latency_s=0.15) as srv:
        run_teacher_batch(endpoint(srv), [TeacherRequest("warm-up", MESSAGES)], progress=False)
        srv.reset_stats()  # the SDK's first call in a process pays one-off set-up costs
        requests = [TeacherRequest(f"ex/{i}", MESSAGES) for i in range(16)]
        results = run_teacher_batch(endpoint(srv), requests, concurrency=4, retry=FAST, progress=False)
        assert all(r.ok and r.tries == 1 for r in results)
        assert srv.max_in_flight == 4  # never above the limit, and the limit was actually used
        assert [r.example_id for r in results] == [r.example_id for r in requests]  # input order


def test_requests_queue_for_a_slot_not_inside_the_http_pool(key: str) -> None:
    """Our slots, not the HTTP pool, do the queueing: a request's try (and its timeout) begins only when
    a connection is free for it. The first 12 requests the server gets are answered after the timeout,
    the others at once; a request queued inside a pool behind those 12 would spend its timeout there and
    time out without ever being sent. Counted, not timed: all 16 requests reached the server, and only
    the 12 held ones timed out. 12 slots make two pools of 6 connections (POOL_SHARD_SIZE 8), so a pool
    given more requests than connections fails this too."""
    from cellduality.teacher.client import POOL_SHARD_SIZE

    assert 12 // 2 <= POOL_SHARD_SIZE < 12  # two pools
    retry = RetryPolicy(max_tries=1, backoff_base_s=0.01)
    with OpenAITestServer(fault_fn=lambda request: Fault.slow(60.0) if request.index < 12 else None) as srv:
        requests = [TeacherRequest(f"ex/{i}", MESSAGES) for i in range(16)]
        results = run_teacher_batch(
            endpoint(srv, timeout_s=1.0), requests, concurrency=12, retry=retry, progress=False
        )
        sent = len(srv.requests)
    assert sent == 16, f"{16 - sent} of 16 requests timed out before they were sent"
    assert Counter(r.error for r in results) == {"timeout": 12, None: 4}


def test_weighted_choice_is_seeded_and_reproducible(key: str) -> None:
    with OpenAITestServer() as srv_a, OpenAITestServer() as srv_b:
        eps = [endpoint(srv_a, "big", weight=3.0), endpoint(srv_b, "small", weight=1.0)]
        ids = [f"ds/annotation/train/cell{i}" for i in range(2000)]
        first = [choose_teacher(eps, i, 0, seed=7).model for i in ids]
        assert first == [choose_teacher(eps, i, 0, seed=7).model for i in ids]
        assert first != [choose_teacher(eps, i, 0, seed=8).model for i in ids]
        assert first != [choose_teacher(eps, i, 1, seed=7).model for i in ids]  # attempts re-draw
        assert Counter(first)["big"] / len(ids) == pytest.approx(0.75, abs=0.04)
        assert {choose_teacher([*eps, endpoint(srv_a, "off", weight=0.0)], i).model for i in ids} <= {
            "big",
            "small",
        }

        requests = [TeacherRequest(i, MESSAGES, attempt=a) for i in ids[:30] for a in (0, 1)]
        results = run_teacher_batch(eps, requests, concurrency=8, seed=7, retry=FAST, progress=False)
        assert [r.teacher for r in results] == [
            choose_teacher(eps, r.example_id, r.attempt, 7).model for r in results
        ]
        served = Counter(r.model for r in srv_a.requests + srv_b.requests)
        assert served == Counter(r.teacher for r in results)
        assert {r.model for r in srv_a.requests} <= {"big"} and {r.model for r in srv_b.requests} <= {"small"}


def test_key_is_sent_but_never_leaks(key: str, tmp_path) -> None:
    with OpenAITestServer() as srv:
        # A proxy that echoes the Authorization header in its error body: the client must scrub it.
        srv.inject(Fault.server_error(500, echo_authorization=True))
        ep = endpoint(srv, price_in_per_mtok=1.0, price_out_per_mtok=1.0)
        client = TeacherClient(ep, concurrency=2, retry=RetryPolicy(max_tries=1))
        store_path = tmp_path / "attempts.jsonl"
        with AttemptStore(store_path) as store:
            results = asyncio.run(
                _run(client, [TeacherRequest("a", MESSAGES), TeacherRequest("b", MESSAGES)], store)
            )
        assert sorted(r.error or "ok" for r in results) == ["http_500", "ok"]
        failed = next(r for r in results if r.error)
        assert "***" in (failed.detail or "")
        assert srv.authorization_headers == [f"Bearer {key}"] * 2  # sent to the server ...
        texts = [repr(ep), str(ep), ep.name, repr(client), *map(repr, results), *map(str, results)]
        texts += [r.detail or "" for r in results]
        assert not any(key in t for t in texts)  # ... but not in anything we show
        written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
        assert written and key.encode() not in written  # ... nor in anything we write


async def _run(client: TeacherClient, requests, store: AttemptStore):
    async with client:
        return await client.run(requests, on_result=store.append_result)


def test_openai_account_ids_are_not_sent_to_other_hosts(
    key: str, server: OpenAITestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_ORG_ID", "org-private-123")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-private-456")
    monkeypatch.setenv("OPENAI_ADMIN_KEY", "sk-admin-private-789")
    assert one(server).ok
    headers = server.requests[0].headers
    assert headers["authorization"] == f"Bearer {key}"
    assert not any("private" in v for v in headers.values()), headers


def test_key_is_read_at_call_time(monkeypatch: pytest.MonkeyPatch, server: OpenAITestServer) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-first-key-000")
    ep = endpoint(server)

    async def go() -> None:
        async with TeacherClient(ep, retry=FAST) as client:
            assert (await client.complete(TeacherRequest("a", MESSAGES))).ok
            monkeypatch.setenv(KEY_ENV, "sk-rotated-key-111")
            assert (await client.complete(TeacherRequest("b", MESSAGES))).ok
            monkeypatch.delenv(KEY_ENV)
            missing = await client.complete(TeacherRequest("c", MESSAGES))
            assert missing.error == "missing_api_key" and KEY_ENV in (missing.detail or "")

    asyncio.run(go())
    assert server.authorization_headers == ["Bearer sk-first-key-000", "Bearer sk-rotated-key-111"]


def test_missing_key_fails_before_sending(monkeypatch: pytest.MonkeyPatch, server: OpenAITestServer) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(MissingAPIKeyError, match=KEY_ENV):
        run_teacher_batch(endpoint(server), [TeacherRequest("a", MESSAGES)], progress=False)
    assert server.requests == []
    keyless = TeacherEndpoint(base_url=server.base_url, model="local", api_key_env=None)
    [result] = run_teacher_batch(keyless, [TeacherRequest("a", MESSAGES)], progress=False)
    assert result.ok and server.authorization_headers == ["Bearer EMPTY"]


def test_callback_runs_per_item_and_its_failure_stops_the_batch(key: str) -> None:
    with OpenAITestServer(latency_s=0.02) as srv:
        seen: list[str] = []
        requests = [TeacherRequest(f"ex/{i}", MESSAGES) for i in range(12)]
        run_teacher_batch(
            endpoint(srv), requests, lambda r: seen.append(r.example_id), concurrency=3, progress=False
        )
        assert sorted(seen) == sorted(r.example_id for r in requests)

        def explode(result) -> None:
            raise OSError("disk full")

        many = (TeacherRequest(f"big/{i}", MESSAGES) for i in range(10_000))
        with pytest.raises(OSError, match="disk full"):
            run_teacher_batch(endpoint(srv), many, explode, concurrency=3, progress=False)
        assert len(srv.requests) < 12 + 20  # pending work was cancelled, the generator not drained


def test_callbacks_run_in_order_on_a_helper_thread_or_in_the_loop(key: str, server: OpenAITestServer) -> None:
    requests = [TeacherRequest(f"ex/{i}", MESSAGES) for i in range(6)]
    threads: list[str] = []
    run_teacher_batch(
        endpoint(server), requests, lambda r: threads.append(threading.current_thread().name), progress=False
    )
    assert len(threads) == 6 and all(name.startswith("teacher-callback") for name in threads)

    threads.clear()
    run_teacher_batch(
        endpoint(server),
        requests,
        lambda r: threads.append(threading.current_thread().name),
        callback_thread=False,
        progress=False,
    )
    assert threads == [threading.current_thread().name] * 6

    seen: list[str] = []

    async def save(result) -> None:
        await asyncio.sleep(0)
        seen.append(result.example_id)

    run_teacher_batch(endpoint(server), requests, save, progress=False)
    assert sorted(seen) == sorted(r.example_id for r in requests)


def test_sync_helper_works_inside_a_running_loop(key: str, server: OpenAITestServer) -> None:
    async def inside() -> list:
        return run_teacher_batch(endpoint(server), [TeacherRequest("a", MESSAGES)], progress=False)

    [result] = asyncio.run(inside())
    assert result.ok


def test_progress_bar_does_not_break_anything(key: str, server: OpenAITestServer, capsys) -> None:
    results = run_teacher_batch(
        endpoint(server), [TeacherRequest(f"p/{i}", MESSAGES) for i in range(5)], progress=True
    )
    assert all(r.ok for r in results)
    assert "5/5" in capsys.readouterr().err


def test_endpoint_validation_and_redacted_repr() -> None:
    with pytest.raises(TeacherConfigError):
        TeacherEndpoint(base_url="api.openai.com/v1", model="m")
    with pytest.raises(TeacherConfigError):
        TeacherEndpoint(base_url="http://h/v1", model="m", weight=-1)
    with pytest.raises(TeacherConfigError):
        TeacherClient([TeacherEndpoint(base_url="http://h/v1", model="m", weight=0.0)])
    ep = TeacherEndpoint(base_url="https://user:hunter2secret@host:8443/v1?api-key=hunter2secret", model="m")
    assert "hunter2secret" not in repr(ep) and "hunter2secret" not in ep.name
    assert ep.name == "m@https://host:8443/v1"


def test_backoff_is_full_jitter_and_capped() -> None:
    policy = RetryPolicy(backoff_base_s=0.5, backoff_max_s=3.0)
    assert policy.backoff_s(1, 0.999) == pytest.approx(0.4995)
    assert policy.backoff_s(3, 0.999) == pytest.approx(1.998)
    assert policy.backoff_s(10, 0.999) == pytest.approx(2.997)  # capped
    assert policy.backoff_s(4, 0.0) == 0.0
    with pytest.raises(TeacherConfigError):
        RetryPolicy(max_tries=0)


# -- an endpoint that accepts connections and never answers --------------------------------------


def test_defaults_detect_a_dead_endpoint_within_a_minute() -> None:
    ep = TeacherEndpoint(base_url="http://127.0.0.1:9/v1", model="m")
    assert ep.connect_timeout_s + ep.first_byte_timeout_s + ep.probe_timeout_s <= 60
    assert ep.timeout_s >= 300  # the total stays generous for long reasoning replies


def test_a_wedged_endpoint_fails_fast_with_no_response(key: str) -> None:
    """Every request (GET /models too) is held without a reply: the liveness check finds it dead, and
    the other requests and their retries fail at once instead of each waiting out its timeout."""
    retries: list[str] = []
    with OpenAITestServer(hang=True) as srv:
        ep = endpoint(srv, timeout_s=60.0, first_byte_timeout_s=0.4, probe_timeout_s=0.4)
        client = TeacherClient(ep, concurrency=4, retry=FAST, on_retry=lambda r, why, w: retries.append(why))
        requests = [TeacherRequest(f"ex/{i}", MESSAGES) for i in range(8)]

        async def go():
            async with client:
                return await client.run(requests)

        results = asyncio.run(go())
    # not 8 requests x 4 tries x 60 s: every try ended on the 0.4 s first-byte check ("no_response"; the
    # 60 s total timeout would say "timeout"), and only the first round was ever sent (below)
    assert [r.error for r in results] == ["no_response"] * 8
    assert all(r.tries == FAST.max_tries for r in results)
    assert "not responding" in results[0].detail and "GET /models" in results[0].detail
    assert retries and set(retries) == {"no_response"} and client.retries == len(retries)
    posts = [h for h in srv.held if h.startswith("POST")]
    assert len(posts) <= 4  # the first round only (4 in flight); the other requests were never sent
    assert any(h.startswith("GET") and h.endswith("/models") for h in srv.held)


def test_a_slow_but_live_endpoint_is_waited_for(key: str, server: OpenAITestServer) -> None:
    """No reply after first_byte_timeout_s, but GET /models answers: the request keeps waiting."""
    server.inject(Fault.slow(1.0))
    result = one(server, timeout_s=10.0, first_byte_timeout_s=0.2, probe_timeout_s=1.0)
    assert result.ok and result.tries == 1 and result.latency_s >= 1.0
