"""The append-only attempt store: durability, crash repair and resume without duplicates."""

from __future__ import annotations

import json
import os

import pytest

from cellduality.teacher import (
    FAILED,
    KEPT,
    REJECTED,
    AttemptRecord,
    AttemptStore,
    RetryPolicy,
    StoreLockedError,
    TeacherEndpoint,
    TeacherRequest,
    TeacherResult,
    run_teacher_batch,
)

try:
    from openai_server import Fault, OpenAITestServer
except ModuleNotFoundError:  # tests/ became a package
    from tests.openai_server import Fault, OpenAITestServer


def rec(
    example_id: str, attempt: int = 0, status: str = KEPT, reason: str | None = None, **kw
) -> AttemptRecord:
    return AttemptRecord(example_id=example_id, attempt=attempt, status=status, reason=reason, **kw)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_append_reopen_roundtrip(tmp_path) -> None:
    path = tmp_path / "run" / "attempts.jsonl"
    with AttemptStore(path) as store:
        store.append(
            rec("a", text="<answer>T cell</answer>", teacher="m", prompt_tokens=3, completion_tokens=4)
        )
        store.append(rec("b", status=REJECTED, reason="wrong_answer", text="<answer>B cell</answer>"))
        store.append(rec("b", attempt=1, status=KEPT, text="<answer>T cell</answer>", extra={"score": 1.0}))
    assert len(lines(path)) == 3
    with AttemptStore(path) as again:
        assert len(again) == 3 and again.repaired_bytes == 0 and again.bad_lines == 0
        assert [r.attempt for r in again.attempts("b")] == [0, 1]
        assert again.attempts("b")[1].extra == {"score": 1.0}
        assert again.done_ids() == {"a", "b"}
        assert [r.example_id for r in again.kept()] == ["a", "b"]
        summary = again.summary()
        assert (
            summary["kept"] == 2
            and summary["rejected"] == 1
            and summary["reasons"] == {"rejected:wrong_answer": 1}
        )


def test_every_line_is_fsynced(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    with AttemptStore(tmp_path / "a.jsonl") as store:
        for i in range(3):
            store.append(rec(f"x{i}"))
    assert len(calls) == 3


def test_sync_interval_batches_fsyncs_and_close_syncs(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    path = tmp_path / "a.jsonl"
    store = AttemptStore(path, sync_interval_s=60.0)
    for i in range(5):
        store.append(rec(f"x{i}"))
    assert len(calls) == 1  # the first line; the rest wait for the interval ...
    assert len(lines(path)) == 5  # ... but are already flushed to the OS (a killed process loses none)
    store.close()
    assert len(calls) == 2  # ... and close() syncs them


def test_truncated_last_line_is_repaired(tmp_path) -> None:
    path = tmp_path / "attempts.jsonl"
    with AttemptStore(path) as store:
        store.append(rec("a"))
        store.append(rec("b", status=FAILED, reason="http_429"))
    whole = path.read_bytes()
    partial = json.dumps({"example_id": "c", "attempt": 0, "status": "kept", "text": "<think>half"})[:40]
    path.write_bytes(whole + partial.encode())  # what a kill in the middle of a write leaves

    with AttemptStore(path) as store:
        assert store.repaired_bytes == len(partial)
        assert [r.example_id for r in store.records()] == ["a", "b"]
        assert "c" not in store.done_ids() and store.next_attempt("c") == 0
        store.append(rec("c"))
    assert path.read_bytes().startswith(whole)
    assert [d["example_id"] for d in lines(path)] == ["a", "b", "c"]  # every line parses again


def test_complete_last_line_without_newline_is_kept(tmp_path) -> None:
    path = tmp_path / "attempts.jsonl"
    with AttemptStore(path) as store:
        store.append(rec("a"))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with AttemptStore(path) as store:
        assert store.repaired_bytes == 0 and store.done_ids() == {"a"}
        store.append(rec("b"))
    assert [d["example_id"] for d in lines(path)] == ["a", "b"]


def test_unreadable_middle_line_is_skipped(tmp_path) -> None:
    path = tmp_path / "attempts.jsonl"
    good = json.dumps({"example_id": "a", "attempt": 0, "status": "kept"})
    path.write_text(
        good + "\n{not json\n" + json.dumps({"example_id": "b", "attempt": 0, "status": "kept"}) + "\n"
    )
    with AttemptStore(path) as store:
        assert store.bad_lines == 1 and store.done_ids() == {"a", "b"}


def test_done_ids_with_attempt_limits(tmp_path) -> None:
    with AttemptStore(tmp_path / "a.jsonl") as store:
        store.append(rec("kept"))
        store.append(rec("rej2", 0, REJECTED, "no_answer_tag"))
        store.append(rec("rej2", 1, REJECTED, "wrong_answer"))
        store.append(rec("fail2", 0, FAILED, "http_500"))
        store.append(rec("fail2", 1, FAILED, "timeout"))
        store.append(rec("once", 0, REJECTED, "wrong_answer"))
        assert store.done_ids() == {"kept"}
        assert store.done_ids(max_attempts=2) == {"kept", "rej2", "fail2"}
        assert store.done_ids(max_attempts=2, count_failures=False) == {"kept", "rej2"}
        assert store.next_attempt("rej2") == 2 and store.next_attempt("new") == 0


def test_duplicates_are_refused(tmp_path) -> None:
    with AttemptStore(tmp_path / "a.jsonl") as store:
        store.append(rec("a"))
        with pytest.raises(ValueError, match="already"):
            store.append(rec("a"))
        assert len(store) == 1


def test_record_validation() -> None:
    with pytest.raises(ValueError, match="reason"):
        rec("a", status=REJECTED)
    with pytest.raises(ValueError, match="status"):
        rec("a", status="maybe")
    with pytest.raises(ValueError, match="attempt"):
        rec("a", attempt=-1)


def test_second_writer_is_refused(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    with AttemptStore(path), pytest.raises(StoreLockedError):
        AttemptStore(path)
    with AttemptStore(path):  # released on close
        pass


def test_from_result_maps_status_and_never_has_a_key_field() -> None:
    ok = TeacherResult(example_id="e", attempt=2, teacher="m", endpoint="http://h/v1", text="t", tries=1)
    bad = TeacherResult(
        example_id="e", attempt=3, teacher="m", endpoint="http://h/v1", error="http_429", tries=5
    )
    assert AttemptRecord.from_result(ok).status == KEPT
    assert AttemptRecord.from_result(ok, status=REJECTED, reason="wrong_answer").reason == "wrong_answer"
    failed = AttemptRecord.from_result(bad)
    assert (failed.status, failed.reason, failed.tries) == (FAILED, "http_429", 5)
    names = {f.lower() for f in AttemptRecord.__dataclass_fields__}
    assert not any("key" in n or "auth" in n or "secret" in n for n in names)


def test_resume_after_crash_duplicates_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed half-way (here: its callback dies) resumes from the store and redoes only the rest."""
    monkeypatch.setenv("CELLDUALITY_TEST_TEACHER_KEY", "sk-resume-secret-42")
    path = tmp_path / "attempts.jsonl"
    ids = [f"ds/annotation/train/c{i}" for i in range(20)]
    with OpenAITestServer(latency_s=0.01) as srv:
        srv.inject(Fault.server_error(500))  # one transient failure on the way
        ep = TeacherEndpoint(base_url=srv.base_url, model="m", api_key_env="CELLDUALITY_TEST_TEACHER_KEY")
        retry = RetryPolicy(max_tries=3, backoff_base_s=0.01)

        store = AttemptStore(path)
        written = 0

        def save_then_crash(result: TeacherResult) -> None:
            nonlocal written
            if written == 8:
                raise KeyboardInterrupt  # the process is killed after 8 saved results
            store.append_result(result)
            written += 1

        with pytest.raises(KeyboardInterrupt):
            run_teacher_batch(
                ep,
                [TeacherRequest(i, []) for i in ids],
                save_then_crash,
                concurrency=4,
                retry=retry,
                progress=False,
            )
        store.close()
        with open(path, "ab") as f:  # and the kill left half a line behind
            f.write(b'{"example_id": "ds/annotation/train/c19", "att')

        with AttemptStore(path) as store:
            done = store.done_ids()
            assert len(done) == 8 and store.repaired_bytes > 0
            todo = [TeacherRequest(i, [], attempt=store.next_attempt(i)) for i in ids if i not in done]
            run_teacher_batch(ep, todo, store.append_result, concurrency=4, retry=retry, progress=False)
            assert store.done_ids() == set(ids)

    keys = [(d["example_id"], d["attempt"]) for d in lines(path)]
    assert len(keys) == len(set(keys)) == 20
    assert b"sk-resume-secret-42" not in path.read_bytes()
