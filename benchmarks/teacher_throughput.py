"""Teacher-client throughput against a local OpenAI-compatible server with a fixed latency.

Why: distilling SFT data is bound by how many teacher requests we keep in flight, not by our CPU.
With a fixed server latency L and a concurrency limit C, the ideal rate is C / L requests per second
(32 / 0.2 s = 160 req/s); the ratio measured / ideal shows how much the client itself (the SDK, the
connection pool, our retry bookkeeping, the event loop) costs. Target: >= 0.8.

By default the server runs in a separate process, so its threads do not compete with the client for
the GIL (a real teacher is on another machine); ``--in-process`` runs it in a thread instead.
``--store PATH`` also appends every result to an fsync'd :class:`AttemptStore`, as a real run does.

    python benchmarks/teacher_throughput.py                 # 500 requests, concurrency 32, 200 ms
    python benchmarks/teacher_throughput.py --store /tmp/bench.jsonl --strict
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cellduality.teacher import (  # noqa: E402 - after the path set-up above
    AttemptStore,
    RetryPolicy,
    TeacherClient,
    TeacherEndpoint,
    TeacherRequest,
    TeacherResult,
)

KEY_ENV = "CELLDUALITY_BENCH_KEY"


def start_server(latency: float, in_process: bool) -> tuple[str, object]:
    """Return (base_url, handle) for a local server with the given fixed latency."""
    if in_process:
        from openai_server import OpenAITestServer

        server = OpenAITestServer(latency_s=latency).start()
        return server.base_url, server
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "openai_server.py"), "--latency", str(latency)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # "serving http://127.0.0.1:PORT/v1"
    if not line.startswith("serving "):
        proc.kill()
        raise RuntimeError(f"test server did not start: {line!r}")
    return line.split()[1], proc


def stop_server(handle: object) -> None:
    if isinstance(handle, subprocess.Popen):
        handle.terminate()
        handle.wait(timeout=10)
    else:
        handle.close()  # type: ignore[attr-defined]


async def timed_run(
    endpoint: TeacherEndpoint,
    requests: list[TeacherRequest],
    concurrency: int,
    retry: RetryPolicy,
    store: AttemptStore | None,
) -> tuple[list[TeacherResult], float, float]:
    """Warm one client up (the SDK's first requests pay one-off costs, connections get opened),
    then time the batch on the same client: the steady state of a long distillation run."""
    async with TeacherClient(endpoint, concurrency=concurrency, retry=retry) as client:
        warm = [TeacherRequest(f"warm/{i}", r.messages) for i, r in enumerate(requests[:concurrency])]
        await client.run(warm)
        on_result = store.append_result if store is not None else None
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await client.run(requests, on_result)
        return results, time.perf_counter() - t0, time.process_time() - cpu0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2, help="server latency per request, seconds")
    parser.add_argument(
        "--in-process", action="store_true", help="run the server in a thread of this process"
    )
    parser.add_argument("--store", type=Path, default=None, help="also append each result to this store")
    parser.add_argument(
        "--sync-interval", type=float, default=0.0, help="store fsync interval, s (0 = every line)"
    )
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--strict", action="store_true", help="exit 1 when below target")
    args = parser.parse_args()

    os.environ.setdefault(KEY_ENV, "sk-benchmark-not-a-real-key")
    base_url, handle = start_server(args.latency, args.in_process)
    try:
        endpoint = TeacherEndpoint(base_url=base_url, model="bench", api_key_env=KEY_ENV, timeout_s=30)
        messages = [
            {"role": "system", "content": "You are an expert single-cell biologist."},
            {
                "role": "user",
                "content": "Which cell type expresses: " + " ".join(f"GENE{i}" for i in range(100)),
            },
        ]
        retry = RetryPolicy(max_tries=3, backoff_base_s=0.05)
        requests = [TeacherRequest(f"bench/{i}", messages) for i in range(args.requests)]
        store = None
        if args.store is not None:
            if args.store.exists():
                args.store.unlink()
            store = AttemptStore(args.store, sync_interval_s=args.sync_interval)
        results, elapsed, cpu = asyncio.run(timed_run(endpoint, requests, args.concurrency, retry, store))
        if store is not None:
            store.close()
    finally:
        stop_server(handle)

    ok = sum(r.ok for r in results)
    rate = len(results) / elapsed
    ideal = args.concurrency / args.latency
    ratio = rate / ideal
    latencies = sorted(r.latency_s for r in results)
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(
        f"teacher throughput: {len(results)} requests, concurrency {args.concurrency}, "
        f"server latency {args.latency * 1000:.0f} ms ({'in-process' if args.in_process else 'separate process'}"
        f"{(', store fsync every ' + (f'{args.sync_interval:g} s' if args.sync_interval else 'line')) if args.store else ''})"
    )
    print(
        f"  ok {ok}/{len(results)}, elapsed {elapsed:.2f} s, client CPU {cpu:.2f} s ({cpu / len(results) * 1000:.2f} ms/request)"
    )
    print(f"  request latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    print(f"  {rate:.1f} req/s vs ideal {ideal:.1f} req/s -> ratio {ratio:.3f} (target >= {args.target})")
    print("  PASS" if ratio >= args.target and ok == len(results) else "  BELOW TARGET")
    return 1 if args.strict and (ratio < args.target or ok != len(results)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
