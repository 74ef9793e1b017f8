"""Append-only JSONL store of teacher attempts: the durable record of an SFT distillation run.

Why append-only JSONL with an fsync per line: a distillation run costs money and hours, and gets
killed (pre-emption, Ctrl-C, OOM). Every finished attempt is one self-contained line, written and
fsync'd before the next, so a kill loses at most the line being written. On open, a truncated last
line (the only damage such a kill can do) is repaired: completed-but-unterminated JSON gets its
newline, a partial line is cut off, and that example is simply asked again. :meth:`AttemptStore.done_ids`
tells a resumed run which examples already reached a final state, and :meth:`AttemptStore.next_attempt`
gives fresh attempt numbers, so nothing is duplicated. An exclusive advisory lock stops a second
process from appending to the same file at the same time.

A record holds the example id, attempt number, teacher model, a secret-free endpoint label,
status (``kept`` / ``rejected`` + reason / ``failed`` + reason), token counts, cost and the completion
text. There is deliberately no field for credentials, and records built from a
:class:`~cellduality.teacher.client.TeacherResult` copy only those fields.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:  # POSIX only; elsewhere the store works without the single-writer guard
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from cellduality.teacher.client import TeacherResult

__all__ = ["FAILED", "KEPT", "REJECTED", "STATUSES", "AttemptRecord", "AttemptStore", "StoreLockedError"]

logger = logging.getLogger(__name__)

KEPT = "kept"
REJECTED = "rejected"
FAILED = "failed"
STATUSES = (KEPT, REJECTED, FAILED)


class StoreLockedError(RuntimeError):
    """Another process holds the store open for writing."""


@dataclass
class AttemptRecord:
    """One line of the store: one generation attempt for one example.

    ``status`` is ``kept`` (a usable completion: the example is done), ``rejected`` (a completion
    that failed a quality filter; ``reason`` says which) or ``failed`` (no usable completion from
    the teacher; ``reason`` is the client's error, e.g. ``http_429``). ``extra`` holds any further
    JSON-serialisable details (filter scores, the parsed answer).
    """

    example_id: str
    attempt: int
    status: str
    reason: str | None = None
    teacher: str | None = None
    endpoint: str | None = None
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    tries: int | None = None
    created_at: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.example_id, str) or not self.example_id:
            raise ValueError("example_id must be a non-empty string")
        if not isinstance(self.attempt, int) or self.attempt < 0:
            raise ValueError(f"attempt must be an int >= 0, got {self.attempt!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if self.status != KEPT and not self.reason:
            raise ValueError(f"a {self.status!r} record needs a reason")

    @classmethod
    def from_result(
        cls,
        result: TeacherResult,
        status: str | None = None,
        reason: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> AttemptRecord:
        """Build a record from a client result.

        ``status`` defaults to ``failed`` (with the client's error as reason) for failed results and
        ``kept`` otherwise; pass ``status="rejected", reason=...`` after a quality filter says no.
        """
        if status is None:
            status = KEPT if result.ok else FAILED
        if status == FAILED and reason is None:
            reason = result.error or "unknown"
        return cls(
            example_id=result.example_id,
            attempt=result.attempt,
            status=status,
            reason=reason,
            teacher=result.teacher,
            endpoint=result.endpoint,
            text=result.text,
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cost_usd=result.cost_usd,
            latency_s=round(result.latency_s, 4),
            tries=result.tries,
            extra=dict(extra or {}),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AttemptRecord:
        """Rebuild a record from a parsed line, ignoring keys a newer version may have added."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class AttemptStore:
    """Append-only, crash-tolerant JSONL file of :class:`AttemptRecord` lines.

    Open it (the file and its folder are created), ``append`` records as results arrive, and on a
    resume skip ``done_ids()``. Use as a context manager or call :meth:`close`.
    Every line is flushed to the OS before ``append`` returns, which is all a killed *process*
    needs. ``fsync`` (default: every line) also protects against an OS crash or power loss; an fsync
    costs milliseconds on real disks (about 5 ms here), which caps a store at roughly 200 lines/s, so
    ``sync_interval_s > 0`` fsyncs at most that often (and on close), losing at most that many
    seconds of lines to a power cut. ``fsync=False`` never fsyncs (tests, scratch runs).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fsync: bool = True, sync_interval_s: float = 0.0
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.sync_interval_s = sync_interval_s
        self._last_sync = 0.0
        self._unsynced = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = open(self.path, "a+b")  # noqa: SIM115 - held open for the store's lifetime
        try:
            self._acquire_lock()
            #: bytes cut from a truncated last line when the store was opened (0 = none)
            self.repaired_bytes = self._repair_tail()
            #: lines that could not be parsed (skipped) when the store was opened
            self.bad_lines = 0
            self._attempts: dict[str, dict[int, AttemptRecord]] = {}
            for record in self._read():
                self._index(record)
        except BaseException:
            self._file.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise StoreLockedError(
                f"{self.path} is open for writing in another process; stop that run before resuming"
            ) from exc

    def close(self) -> None:
        """Flush, release the lock and close the file (idempotent)."""
        with self._lock:
            if not self._file.closed:
                if self._unsynced:
                    self._sync()
                self._file.flush()
                self._file.close()

    def __enter__(self) -> AttemptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AttemptStore({str(self.path)!r}, records={len(self)})"

    # -- crash repair ----------------------------------------------------------------------------
    def _repair_tail(self) -> int:
        """Make the file end with a newline after a complete record; return bytes removed.

        A kill during a write can leave a partial last line. If that tail is in fact a complete JSON
        object (only the newline is missing) it is kept; otherwise it is cut off.
        """
        f = self._file
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Find the start of the last line by scanning back in blocks.
        pos = size
        start = 0
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            newline = block.rfind(b"\n")
            if newline != -1:
                start = pos + newline + 1
                break
        f.seek(start)
        tail = f.read()
        try:
            data = json.loads(tail)
            AttemptRecord.from_json(data)
        except (ValueError, TypeError):
            f.truncate(start)
            self._sync()
            logger.warning(
                "%s: removed a truncated last line (%d bytes) left by an interrupted run",
                self.path,
                len(tail),
            )
            return len(tail)
        f.seek(0, os.SEEK_END)
        f.write(b"\n")
        self._sync()
        return 0

    def _sync(self, *, lazy: bool = False) -> None:
        """Flush to the OS; fsync now, or (``lazy``) only if ``sync_interval_s`` has passed."""
        self._file.flush()
        if not self.fsync:
            return
        now = time.monotonic()
        if lazy and now - self._last_sync < self.sync_interval_s:
            self._unsynced = True
            return
        os.fsync(self._file.fileno())
        self._last_sync = now
        self._unsynced = False

    # -- reading ---------------------------------------------------------------------------------
    def _read(self) -> Iterator[AttemptRecord]:
        self._file.flush()
        with open(self.path, "rb") as reader:
            for number, line in enumerate(reader, start=1):
                if not line.strip():
                    continue
                try:
                    yield AttemptRecord.from_json(json.loads(line))
                except (ValueError, TypeError) as exc:
                    self.bad_lines += 1
                    logger.warning("%s:%d: skipping unreadable line (%s)", self.path, number, exc)

    def records(self) -> list[AttemptRecord]:
        """All records, grouped by example in first-seen order (at most one per example id and attempt)."""
        with self._lock:
            return [r for attempts in self._attempts.values() for r in attempts.values()]

    def attempts(self, example_id: str) -> list[AttemptRecord]:
        """The records of one example, by attempt number."""
        with self._lock:
            return [r for _, r in sorted(self._attempts.get(example_id, {}).items())]

    def __len__(self) -> int:
        return sum(len(a) for a in self._attempts.values())

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._attempts

    def kept(self) -> list[AttemptRecord]:
        """The kept records (at most one per example): what becomes SFT data."""
        return [r for r in self.records() if r.status == KEPT]

    def done_ids(self, max_attempts: int | None = None, *, count_failures: bool = True) -> set[str]:
        """Example ids in a final state, which a resumed run must skip.

        An example is final once an attempt was kept, or (with ``max_attempts``) once it used up its
        attempts. ``count_failures=False`` counts only rejected attempts towards that limit, so
        examples that failed for infrastructure reasons (an outage, a bad key) are tried again.
        """
        done: set[str] = set()
        with self._lock:
            for example_id, attempts in self._attempts.items():
                statuses = [r.status for r in attempts.values()]
                if KEPT in statuses:
                    done.add(example_id)
                elif max_attempts is not None:
                    used = sum(1 for s in statuses if s == REJECTED or (count_failures and s == FAILED))
                    if used >= max_attempts:
                        done.add(example_id)
        return done

    def next_attempt(self, example_id: str) -> int:
        """The attempt number a new try of ``example_id`` must use (0 for a new example)."""
        with self._lock:
            attempts = self._attempts.get(example_id)
            return max(attempts) + 1 if attempts else 0

    def summary(self) -> dict[str, Any]:
        """Counts per status and failure/rejection reason, tokens and cost: for logs and reports."""
        out: dict[str, Any] = {"examples": 0, "attempts": 0, "tokens_in": 0, "tokens_out": 0, "cost_usd": 0.0}
        out.update(dict.fromkeys(STATUSES, 0))
        reasons: dict[str, int] = {}
        for record in self.records():
            out["attempts"] += 1
            out[record.status] += 1
            if record.reason:
                key = f"{record.status}:{record.reason}"
                reasons[key] = reasons.get(key, 0) + 1
            out["tokens_in"] += record.prompt_tokens or 0
            out["tokens_out"] += record.completion_tokens or 0
            out["cost_usd"] += record.cost_usd or 0.0
        out["examples"] = len(self._attempts)
        out["reasons"] = dict(sorted(reasons.items()))
        return out

    # -- writing ---------------------------------------------------------------------------------
    def _index(self, record: AttemptRecord) -> None:
        attempts = self._attempts.setdefault(record.example_id, {})
        if record.attempt in attempts:
            logger.warning(
                "%s: duplicate record for %s attempt %d; keeping the first",
                self.path,
                record.example_id,
                record.attempt,
            )
            return
        attempts[record.attempt] = record

    def append(self, record: AttemptRecord) -> None:
        """Write one record as one line, flushed (and fsync'd, see the class) before returning.

        Raises ``ValueError`` if this example id and attempt number are already stored (a resume
        must use :meth:`next_attempt`), and ``TypeError`` if ``extra`` is not JSON-serialisable.
        """
        line = json.dumps(asdict(record), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        data = (line + "\n").encode("utf-8")
        with self._lock:
            if self._file.closed:
                raise ValueError(f"{self.path} is closed")
            if record.attempt in self._attempts.get(record.example_id, {}):
                raise ValueError(
                    f"{record.example_id} attempt {record.attempt} is already in {self.path}; "
                    "use next_attempt() for a new try"
                )
            self._file.seek(0, os.SEEK_END)
            self._file.write(data)
            self._sync(lazy=True)
            self._attempts.setdefault(record.example_id, {})[record.attempt] = record

    def append_result(
        self,
        result: TeacherResult,
        status: str | None = None,
        reason: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> AttemptRecord:
        """Shortcut for ``append(AttemptRecord.from_result(...))``; returns the stored record."""
        record = AttemptRecord.from_result(result, status=status, reason=reason, extra=extra)
        self.append(record)
        return record
