"""SFT data generation: teacher traces for forward and dual examples, filtered, resumable, on disk.

The engine behind ``cellduality sft-data`` and ``sft_data/generate.py`` (and the SFT entry point, which
calls it with the offline teacher when no SFT data exist yet). For every chosen training example:

1. the *forward* question (the example's own prompt) goes to the teacher, and the trace is filtered
   (``cellduality.teacher.filters``); a rejected trace is asked again, up to ``max_attempts`` times
   (rejection sampling; an LLM teacher samples at temperature > 0, so a retry can differ);
2. once the forward trace is kept, the *dual* question is built from the ground-truth output and the
   known inputs, ``dual_prompt(row, row["answer"])`` (class reconstruction for the generation tasks, gene
   in-painting for the classification tasks), and goes through the same loop with ``dual_score``. A
   task without a dual (neighbourhood editing) gets forward examples only.

Why one coroutine per example rather than batches per round: the dual question of an example can go
out as soon as its forward trace is kept, so no request waits for the slowest request of a round; the
teacher client's slot queue bounds the HTTP requests in flight whatever the number of coroutines.

Every attempt is appended to ``OUT/attempts.jsonl`` (the colleague's ``AttemptStore``: one fsync'd JSON
line each, a torn last line repaired on open) the moment it is judged, before anything depends on it.
A run killed at any moment and started again with the same command skips the examples that reached a
final state, continues the others with fresh attempt numbers, and therefore loses and duplicates
nothing; the example ids are deterministic (``{row id}/forward``, ``{row id}/dual``). The dataset
(``OUT/dataset``, a ``DatasetDict`` with a ``train`` split) and ``OUT/summary.json`` are rebuilt from
the store at the end of every run, so they never disagree with it.

Only the ``train`` split of the prepared data is read, by the filters and by the offline teacher alike.
The API key stays in the environment: endpoints name the variable, the client reads it per request, and
nothing written here has a field that could hold it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cellduality.teacher.client import (
    RetryPolicy,
    TeacherClient,
    TeacherEndpoint,
    TeacherRequest,
    TeacherResult,
    redact_url,
    run_coroutine,
)
from cellduality.teacher.filters import DEFAULT_RWJS_THRESHOLD, Verdict, judge
from cellduality.teacher.prompts import DUAL, FORWARD, teacher_messages
from cellduality.teacher.store import FAILED, KEPT, REJECTED, AttemptRecord, AttemptStore

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

    from cellduality.tasks.build import PreparedTasks

__all__ = [
    "DATASET_DIR",
    "OFFLINE",
    "PREPARED_DIR",
    "RUN_FILE",
    "SFT_COLUMNS",
    "STORE_FILE",
    "SUMMARY_FILE",
    "GenerationConfig",
    "NothingKeptError",
    "TeacherUnavailableError",
    "example_id",
    "load_sft_dataset",
    "run_generation",
    "select_rows",
]

logger = logging.getLogger(__name__)

STORE_FILE = "attempts.jsonl"
DATASET_DIR = "dataset"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"
PREPARED_DIR = "prepared"
OFFLINE = "offline"
PENDING = "pending"

#: Columns of the SFT dataset; ``prompt`` and ``completion`` are chat messages (TRL's conversational
#: prompt-completion format), the rest is for filtering and bookkeeping.
SFT_COLUMNS = ("id", "task", "kind", "prompt", "completion", "teacher", "dataset", "score")

#: Client errors that no retry or later example can fix: the run stops instead of burning the list.
#: ``rate_limited``: the server asked to wait longer than the ceiling (a quota): every request would too.
FATAL_ERRORS = frozenset({"http_401", "http_403", "http_404", "missing_api_key", "rate_limited"})

TASK_ORDER = ("annotation", "generation", "drug_sensitivity", "perturbation", "neighbourhood")


class TeacherUnavailableError(RuntimeError):
    """The teacher keeps failing (bad key, unknown model, endpoint down): the run stopped early.

    Everything generated so far is in the attempt store; running the same command again resumes.
    """


class NothingKeptError(TeacherUnavailableError):
    """Every example failed or was rejected: the run made nothing a later stage could train on.

    Raised after the summary is written and instead of writing ``OUT/dataset``: an empty (or
    counterfactual-only) dataset would look finished to ``cellduality sft`` and to a pipeline that
    only reads the exit status. The message says which reasons ended the examples and what to check.
    """


@dataclass
class GenerationConfig:
    """What to generate and how.

    ``data``: prepared folders (``cellduality prepare``) and/or embedded dataset names; an embedded name
    is built once into ``OUT/prepared/<name>`` with ``top_k`` / ``n_genes`` / ``split`` / ``seed``.
    ``tasks``: the tasks to use (default: all present). ``limit``: forward examples per task, a seeded
    choice that grows by prefix (a larger limit keeps the smaller one's examples).
    ``teachers``: OpenAI-compatible endpoints, mixed by weight; none = the offline teacher.
    ``max_attempts``: tries per example before it is rejected (the offline teacher is deterministic, so
    it gets one). A try that failed for an infrastructure reason (after the client's own HTTP retries)
    also uses up one try of this run, but is tried again by the next run.
    ``rwjs_threshold``: the bar for gene-list answers. ``duals``: also make dual examples.
    ``abort_after_failures``: stop the run after this many failed attempts in a row (default
    ``max(20, 2 * concurrency)``): an endpoint that is down must not be asked 10,000 times.
    ``offline_concise``: the offline teacher's short, formulaic rationales (for tiny models).
    ``counterfactuals``: counterfactual dual examples per forward example (the dual asked with a wrong
    forward answer, answered from the training data: :mod:`cellduality.teacher.counterfactual`); they
    teach the policy to read the forward answer, without which the dual reward carries no signal.
    """

    data: str | Sequence[str]
    out: str | os.PathLike[str]
    tasks: Sequence[str] | None = None
    limit: int | None = None
    seed: int = 0
    teachers: Sequence[TeacherEndpoint] = ()
    concurrency: int = 16
    max_attempts: int = 4
    rwjs_threshold: float = DEFAULT_RWJS_THRESHOLD
    duals: bool = True
    retry: RetryPolicy | None = None
    top_k: int = 100
    n_genes: int | None = None
    split: str = "id"
    progress: bool = True
    sync_interval_s: float = 1.0
    abort_after_failures: int | None = None
    offline_concise: bool = False
    counterfactuals: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [os.fspath(self.data)]
        self.data = [os.fspath(d) for d in self.data]
        if not self.data:
            raise ValueError("name at least one data source (a prepared folder or an embedded dataset)")
        if self.tasks is not None:
            self.tasks = list(self.tasks) or None
        self.teachers = tuple(self.teachers)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0.0 <= self.rwjs_threshold <= 1.0:
            raise ValueError(f"rwjs_threshold must be in [0, 1], got {self.rwjs_threshold}")

    @property
    def offline(self) -> bool:
        return not self.teachers

    def settings(self) -> dict[str, Any]:
        """The run's settings as JSON, free of secrets (endpoints by redacted name, keys by variable)."""
        return {
            "data": list(self.data),
            "tasks": list(self.tasks) if self.tasks else None,
            "limit": self.limit,
            "seed": self.seed,
            "max_attempts": self.max_attempts,
            "rwjs_threshold": self.rwjs_threshold,
            "duals": self.duals,
            "counterfactuals": self.counterfactuals,
            "offline_concise": self.offline_concise,
            "concurrency": self.concurrency,
            "build": {"top_k": self.top_k, "n_genes": self.n_genes, "split": self.split},
            "teachers": [_teacher_info(e) for e in self.teachers] or [{"name": OFFLINE}],
        }


def _teacher_info(endpoint: TeacherEndpoint) -> dict[str, Any]:
    return {
        "name": endpoint.name,
        "model": endpoint.model,
        "endpoint": redact_url(endpoint.base_url),
        "weight": endpoint.weight,
        "api_key_env": endpoint.api_key_env,
        "temperature": endpoint.temperature,
        "max_tokens": endpoint.max_tokens,
        "price_in_per_mtok": endpoint.price_in_per_mtok,
        "price_out_per_mtok": endpoint.price_out_per_mtok,
    }


def _wants_dual(config: GenerationConfig, row: Mapping[str, Any]) -> bool:
    """A dual example is made when asked for and the row's task has a dual (neighbourhood editing has none)."""
    from cellduality.tasks.dual import has_dual

    return bool(config.duals) and has_dual(row.get("task"))


def example_id(row: Mapping[str, Any], kind: str) -> str:
    """The deterministic id of the forward or dual example made from a task row."""
    return f"{row['id']}/{kind}"


# -- data ----------------------------------------------------------------------------------------


def load_sources(config: GenerationConfig) -> PreparedTasks:
    """The prepared tasks of every ``config.data`` source, merged (embedded names built once)."""
    from cellduality.data import EMBEDDED
    from cellduality.data.schema import DataError
    from cellduality.tasks.build import META_FILE, load_prepared, merge_prepared

    parts = []
    for source in config.data:
        if (Path(source) / META_FILE).exists():
            parts.append(load_prepared(source))
        elif source in EMBEDDED:
            parts.append(_build_embedded(source, config))
        else:
            raise DataError(
                f"{source!r} is neither a prepared folder (no {META_FILE}; make one with `cellduality "
                f"prepare`) nor an embedded dataset ({', '.join(EMBEDDED)})"
            )
    return merge_prepared(parts)


def _build_embedded(name: str, config: GenerationConfig) -> PreparedTasks:
    """Build an embedded dataset's examples into ``OUT/prepared/<name>`` once; reuse them on resume."""
    from cellduality.tasks.build import prepare_cached
    from cellduality.tasks.common import TaskConfig

    return prepare_cached(
        name,
        Path(config.out) / PREPARED_DIR / name,
        config.tasks,
        split=config.split,
        config=TaskConfig(top_k=config.top_k, n_genes=config.n_genes, seed=config.seed),
    )


def select_rows(train: Dataset, tasks: Sequence[str] | None, limit: int | None, seed: int) -> list[int]:
    """Indices of the forward examples: every row of ``tasks``, or ``limit`` per task (seeded).

    The choice is a prefix of a seeded permutation, so raising ``limit`` on a resume adds examples and
    keeps the ones already generated.
    """
    import numpy as np

    column = np.asarray(train["task"]) if len(train) else np.asarray([], dtype=str)
    present = list(dict.fromkeys(column.tolist()))
    wanted = list(dict.fromkeys(tasks)) if tasks else present
    missing = [t for t in wanted if t not in present]
    if missing:
        from cellduality.data.schema import DataError

        raise DataError(
            f"task(s) {missing} have no training examples in the data; present: {present or 'none'}"
        )
    chosen: list[int] = []
    for task in wanted:
        idx = np.flatnonzero(column == task)
        if limit is not None and idx.size > limit:
            salt = TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER)
            order = np.random.default_rng([seed, salt]).permutation(idx.size)
            idx = np.sort(idx[order[:limit]])
        chosen.extend(int(i) for i in idx)
    return chosen


# -- teachers ------------------------------------------------------------------------------------


class _Teacher(Protocol):
    deterministic: bool

    async def complete(
        self, example: str, attempt: int, row: Mapping[str, Any], kind: str, prompt: list[dict[str, str]]
    ) -> TeacherResult: ...


class _LLMTeacher:
    """An OpenAI-compatible teacher (or a weighted mixture) through the colleague's ``TeacherClient``."""

    deterministic = False

    def __init__(self, client: TeacherClient) -> None:
        self.client = client

    async def complete(
        self, example: str, attempt: int, row: Mapping[str, Any], kind: str, prompt: list[dict[str, str]]
    ) -> TeacherResult:
        messages = teacher_messages(prompt, str(row["task"]), kind)
        return await self.client.complete(TeacherRequest(example, messages, attempt=attempt))


class _OfflineTeacher:
    """``OfflineTeacher`` behind the same interface, so its traces go through the same filters and store.

    It is deterministic: a second attempt would give the same trace, so it gets one.
    """

    deterministic = True

    def __init__(self, train_only: PreparedTasks, concise: bool = False) -> None:
        from cellduality.teacher.offline import OfflineTeacher

        self.teacher = OfflineTeacher(train_only, concise=True) if concise else OfflineTeacher(train_only)

    async def complete(
        self, example: str, attempt: int, row: Mapping[str, Any], kind: str, prompt: list[dict[str, str]]
    ) -> TeacherResult:
        started = time.monotonic()
        result = TeacherResult(
            example_id=example, attempt=attempt, teacher=OFFLINE, endpoint=OFFLINE, tries=1
        )
        try:
            result.text = self.teacher.answer(row, dual_answer=row["answer"] if kind == DUAL else None)
        except Exception as exc:  # a gap in the teacher's statistics is a failed example, not a crash
            result.error, result.detail = "offline_error", f"{type(exc).__name__}: {exc}"[:300]
        result.latency_s = result.elapsed_s = time.monotonic() - started
        return result


# -- the run -------------------------------------------------------------------------------------


def _final_state(records: Sequence[AttemptRecord], cap: int) -> tuple[str, str | None]:
    """(state, reason) of an example from its records: kept, rejected, failed or pending.

    Rejected needs ``cap`` rejected attempts; an example whose last attempt failed (an infrastructure
    error) is failed for this run and tried again by the next one.
    """
    if any(r.status == KEPT for r in records):
        return KEPT, None
    rejected = [r for r in records if r.status == REJECTED]
    if len(rejected) >= cap:
        return REJECTED, rejected[-1].reason
    if records and records[-1].status == FAILED:
        return FAILED, records[-1].reason
    return PENDING, None


class _Run:
    """One pass over the chosen examples: the attempt loop, the store, the progress bar."""

    def __init__(
        self,
        config: GenerationConfig,
        rows: list[dict[str, Any]],
        store: AttemptStore,
        teacher: _Teacher,
        vocabularies: Mapping[str, Mapping[str, str]],
    ) -> None:
        self.config = config
        self.rows = rows
        self.store = store
        self.teacher = teacher
        self.vocabularies = vocabularies
        self.cap = 1 if teacher.deterministic else config.max_attempts
        self.window = 1 if teacher.deterministic else max(2 * config.concurrency, config.concurrency + 8)
        self.abort_after = config.abort_after_failures or max(20, 2 * config.concurrency)
        self.streak = 0  # consecutive failed attempts, across examples
        self.counts: Counter[str] = Counter()
        self.tokens = 0
        self.cost = 0.0
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sft-store")
        self.bar: Any = None
        self.retries = 0  # HTTP retries inside the client, shown in the progress line as they happen
        self.last_retry = ""

    def retried(self, result: TeacherResult, reason: str, wait_s: float) -> None:
        """The client is about to retry a request: say so in the progress line at once."""
        self.retries += 1
        self.last_retry = f"{reason}, try {result.tries + 1}"
        if self.bar is not None:
            self._postfix()
            self.bar.refresh()

    def prompt(self, row: Mapping[str, Any], kind: str) -> list[dict[str, str]]:
        from cellduality.tasks.dual import dual_prompt

        if kind == FORWARD:
            return [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        return dual_prompt(row, str(row["answer"]), seed=self.config.seed)

    # progress ----------------------------------------------------------------------------------
    def _open_bar(self) -> None:
        from tqdm.auto import tqdm

        total = done = 0
        for row in self.rows:
            state, _ = _final_state(self.store.attempts(example_id(row, FORWARD)), self.cap)
            total += 1
            done += state in (KEPT, REJECTED)
            if _wants_dual(self.config, row) and state != REJECTED:
                total += 1
                dual, _ = _final_state(self.store.attempts(example_id(row, DUAL)), self.cap)
                done += state == KEPT and dual in (KEPT, REJECTED)
        desc = "sft-data (offline teacher)" if self.config.offline else "sft-data"
        self.bar = tqdm(
            total=total,
            initial=done,
            desc=desc,
            unit="ex",
            disable=not self.config.progress,
            dynamic_ncols=True,
        )

    def _settled(self, state: str) -> None:
        self.counts[state] += 1
        if state in (KEPT, REJECTED, FAILED):
            self.bar.update(1)
        self._postfix()

    def _postfix(self) -> None:
        postfix: dict[str, Any] = {k: self.counts[k] for k in (KEPT, REJECTED, FAILED)}
        if self.retries:
            postfix["retries"] = f"{self.retries} ({self.last_retry})"
        if self.tokens:
            postfix["tokens"] = self.tokens
        if self.cost:
            postfix["usd"] = f"{self.cost:.2f}"
        self.bar.set_postfix(postfix, refresh=False)

    def _drop_dual(self) -> None:
        # no forced redraw: a rejected forward example would redraw the bar once each, which floods a log
        # file (tqdm writes every redraw); the next update draws the smaller total within its interval
        self.bar.total -= 1

    # attempts ----------------------------------------------------------------------------------
    async def _append(self, record: AttemptRecord) -> None:
        await asyncio.get_running_loop().run_in_executor(self.io, self.store.append, record)

    def _record(self, row: Mapping[str, Any], kind: str, result: TeacherResult) -> AttemptRecord:
        extra: dict[str, Any] = {
            "task": row["task"],
            "kind": kind,
            "row": row["id"],
            "dataset": row["dataset"],
        }
        if not result.ok:
            extra["detail"] = (result.detail or "")[:300]
            return AttemptRecord.from_result(result, extra=extra)
        verdict: Verdict = judge(
            row,
            kind,
            result.text,
            vocabulary=self.vocabularies.get(str(row["dataset"])),
            rwjs_threshold=self.config.rwjs_threshold,
        )
        extra["score"] = verdict.score
        extra["answer"] = verdict.answer
        if verdict.kept:
            extra["completion"] = verdict.completion
            return AttemptRecord.from_result(result, status=KEPT, extra=extra)
        return AttemptRecord.from_result(result, status=REJECTED, reason=verdict.reason, extra=extra)

    async def settle(self, row: Mapping[str, Any], kind: str) -> str:
        """Ask until the example is kept, rejected ``cap`` times, or failed ``cap`` times in this run."""
        eid = example_id(row, kind)
        state, _ = _final_state(self.store.attempts(eid), self.cap)
        if state in (KEPT, REJECTED):
            return state
        rejected = sum(r.status == REJECTED for r in self.store.attempts(eid))
        failures = 0
        prompt = self.prompt(row, kind)
        while True:
            attempt = self.store.next_attempt(eid)
            result = await self.teacher.complete(eid, attempt, row, kind, prompt)
            record = self._record(row, kind, result)
            await self._append(record)
            self.tokens += (record.prompt_tokens or 0) + (record.completion_tokens or 0)
            self.cost += record.cost_usd or 0.0
            if record.status == FAILED:
                self.streak += 1
                failures += 1
                if record.reason == "rate_limited":
                    raise TeacherUnavailableError(
                        f"the teacher is rate-limited: {record.extra.get('detail', '')}. What was generated is in "
                        f"{self.store.path}; the same command resumes"
                    )
                if record.reason in FATAL_ERRORS or self.streak >= self.abort_after:
                    raise TeacherUnavailableError(
                        f"the teacher keeps failing ({record.reason}: {record.extra.get('detail', '')}); "
                        f"{self.streak} failed attempts in a row. What was generated is in "
                        f"{self.store.path}; fix the cause and run the same command again to resume"
                    )
                if failures >= self.cap:
                    self._settled(FAILED)
                    return FAILED
                continue
            self.streak = 0
            if record.status == KEPT:
                self._settled(KEPT)
                return KEPT
            rejected += 1
            if rejected >= self.cap:
                self._settled(REJECTED)
                return REJECTED

    async def example(self, row: Mapping[str, Any]) -> None:
        before, _ = _final_state(self.store.attempts(example_id(row, FORWARD)), self.cap)
        forward = await self.settle(row, FORWARD)
        if not _wants_dual(self.config, row):
            return
        if forward == KEPT:
            await self.settle(row, DUAL)
        elif before != REJECTED:  # the bar counted a dual for it; there will be none (this run)
            self._drop_dual()

    async def run(self) -> None:
        """Every example in its own coroutine, at most ``window`` at a time; the first error stops all."""
        self._open_bar()
        slots = asyncio.Semaphore(self.window)
        running: set[asyncio.Task[None]] = set()
        errors: list[BaseException] = []

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                errors.append(task.exception())  # type: ignore[arg-type]

        try:
            for row in self.rows:
                await slots.acquire()
                if errors:
                    break
                task = asyncio.ensure_future(self.example(row))
                running.add(task)
                task.add_done_callback(finished)
            while running and not errors:
                await asyncio.wait(set(running), return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in list(running):
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            self.io.shutdown(wait=True)  # an append in progress completes
            self.bar.close()
        if errors:
            raise errors[0]


# -- outputs -------------------------------------------------------------------------------------


def _sft_features():
    from datasets import Features, Value

    message = [{"role": Value("string"), "content": Value("string")}]
    return Features(
        {
            "id": Value("string"),
            "task": Value("string"),
            "kind": Value("string"),
            "prompt": message,
            "completion": message,
            "teacher": Value("string"),
            "dataset": Value("string"),
            "score": Value("float64"),
        }
    )


def build_dataset(rows: Sequence[Mapping[str, Any]], store: AttemptStore, seed: int) -> Dataset:
    """The kept examples as a ``datasets.Dataset`` in plan order (each row's forward, then its dual)."""
    from datasets import Dataset

    from cellduality.tasks.dual import dual_prompt

    out = []
    for row in rows:
        for kind in (FORWARD, DUAL):
            kept = next((r for r in store.attempts(example_id(row, kind)) if r.status == KEPT), None)
            if kept is None:
                continue
            if kind == FORWARD:
                prompt = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
            else:
                prompt = dual_prompt(row, str(row["answer"]), seed=seed)
            out.append(
                {
                    "id": kept.example_id,
                    "task": row["task"],
                    "kind": kind,
                    "prompt": prompt,
                    "completion": [
                        {"role": "assistant", "content": kept.extra.get("completion") or kept.text or ""}
                    ],
                    "teacher": kept.teacher or "",
                    "dataset": row["dataset"],
                    "score": float(kept.extra.get("score") or 0.0),
                }
            )
    features = _sft_features()
    if not out:  # from_list([]) would make a table without columns, which load_from_disk rejects
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return Dataset.from_list(out, features=features)


ROWS_DIGEST_FILE = "cellduality-rows.sha256"
PREVIOUS_DIR = "previous"


def _rows_digest(dataset: Dataset) -> str:
    """A digest of the rows, so a rerun that changes nothing rewrites (and sets aside) nothing."""
    import hashlib

    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _save_dataset(dataset: Dataset, out: Path) -> Path:
    """Write ``OUT/dataset`` atomically, deleting nothing that an earlier run made.

    A killed save never leaves a folder that looks finished: the rows go to a temporary folder named for
    this process, which is renamed into place only once complete. A dataset an earlier run wrote is
    kept: when the rows are unchanged it stays as it is, otherwise it is moved to
    ``OUT/previous/dataset-<UTC time>`` (the user deletes it when sure). A temporary folder that an
    interrupted earlier run left is reported, not removed.
    """
    from datasets import DatasetDict
    from datasets.utils import logging as ds_logging

    target = out / DATASET_DIR
    digest = _rows_digest(dataset)
    marker = target / ROWS_DIGEST_FILE
    if marker.is_file() and marker.read_text().strip() == digest:
        logger.info("%s already holds these %d rows: left as it is", target, len(dataset))
        return target
    for stale in sorted(out.glob(f".{DATASET_DIR}.tmp*")) + sorted(out.glob(f".{DATASET_DIR}.old*")):
        logger.warning("%s was left by an interrupted earlier run; it is not used (delete it by hand)", stale)
    tmp = out / f".{DATASET_DIR}.tmp-{os.getpid()}-{time.time_ns()}"
    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        DatasetDict({"train": dataset}).save_to_disk(str(tmp))
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()
    (tmp / ROWS_DIGEST_FILE).write_text(digest + "\n")
    if target.exists():
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = out / PREVIOUS_DIR / f"{DATASET_DIR}-{stamp}"
        n = 1
        while aside.exists():
            n += 1
            aside = out / PREVIOUS_DIR / f"{DATASET_DIR}-{stamp}-{n}"
        aside.parent.mkdir(exist_ok=True)
        target.rename(aside)
        logger.warning(
            "the earlier dataset in %s is kept at %s (its rows differ from this run's)", out, aside
        )
    tmp.rename(target)
    return target


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def _entry() -> dict[str, Any]:
    return {
        "examples": 0,
        "kept": 0,
        "rejected": {},
        "failed": {},
        "pending": 0,
        "acceptance": None,
        "attempts": 0,
        "mean_score_kept": None,
    }


def _bump(counter: dict[str, int], key: str | None) -> None:
    key = key or "unknown"
    counter[key] = counter.get(key, 0) + 1


def build_summary(
    rows: Sequence[Mapping[str, Any]],
    store: AttemptStore,
    config: GenerationConfig,
    cap: int,
) -> dict[str, Any]:
    """Kept / rejected / failed / pending per task, kind and reason; tokens and estimated cost.

    Example counts are over this run's plan (so ``examples == kept + sum(rejected) + sum(failed) +
    pending`` for every entry); tokens and cost are over every attempt in the store, i.e. what this
    output folder has cost so far, resumed runs included.
    """
    tasks: dict[str, dict[str, dict[str, Any]]] = {}
    scores: dict[tuple[str, str], list[float]] = {}
    totals = {"examples": 0, "kept": 0, "rejected": 0, "failed": 0, "pending": 0}
    for row in rows:
        forward_kept = False
        for kind in (FORWARD, DUAL):
            if kind == DUAL and not (_wants_dual(config, row) and forward_kept):
                continue
            records = store.attempts(example_id(row, kind))
            state, reason = _final_state(records, cap)
            forward_kept = forward_kept or (kind == FORWARD and state == KEPT)
            entry = tasks.setdefault(str(row["task"]), {}).setdefault(kind, _entry())
            entry["examples"] += 1
            entry["attempts"] += len(records)
            totals["examples"] += 1
            totals[state] += 1
            if state == KEPT:
                entry["kept"] += 1
                kept = next(r for r in records if r.status == KEPT)
                scores.setdefault((str(row["task"]), kind), []).append(float(kept.extra.get("score") or 0.0))
            elif state == PENDING:
                entry["pending"] += 1
            else:
                _bump(entry[state], reason)
    for task, kinds in tasks.items():
        for kind, entry in kinds.items():
            entry["acceptance"] = round(entry["kept"] / entry["examples"], 4) if entry["examples"] else None
            values = scores.get((task, kind))
            entry["mean_score_kept"] = round(sum(values) / len(values), 4) if values else None
    ordered = {t: tasks[t] for t in sorted(tasks, key=lambda t: (*TASK_ORDER, t).index(t))}

    attempts: dict[str, Any] = {"total": 0, KEPT: 0, REJECTED: {}, FAILED: {}}
    by_teacher: dict[str, dict[str, Any]] = {}
    prices = {(e.model, redact_url(e.base_url)): e for e in config.teachers}
    tokens_in = tokens_out = 0
    cost: float | None = None
    for record in store.records():
        attempts["total"] += 1
        if record.status == KEPT:
            attempts[KEPT] += 1
        else:
            _bump(attempts[record.status], record.reason)
        name = record.teacher or "unknown"
        teacher = by_teacher.setdefault(
            name, {"attempts": 0, "kept": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": None}
        )
        teacher["attempts"] += 1
        teacher["kept"] += record.status == KEPT
        teacher["prompt_tokens"] += record.prompt_tokens or 0
        teacher["completion_tokens"] += record.completion_tokens or 0
        tokens_in += record.prompt_tokens or 0
        tokens_out += record.completion_tokens or 0
        endpoint = prices.get((record.teacher or "", record.endpoint or ""))
        estimate = (
            endpoint.cost_usd(record.prompt_tokens or 0, record.completion_tokens or 0)
            if endpoint is not None
            else record.cost_usd
        )
        if estimate is not None:
            teacher["cost_usd"] = (teacher["cost_usd"] or 0.0) + estimate
            cost = (cost or 0.0) + estimate
    for teacher in by_teacher.values():
        if teacher["cost_usd"] is not None:
            teacher["cost_usd"] = round(teacher["cost_usd"], 6)
    return {
        # False: running the same command again has work to do (failed or pending examples).
        "complete": totals["pending"] == 0 and totals["failed"] == 0,
        "teacher": OFFLINE if config.offline else "openai-compatible",
        "settings": config.settings(),
        "totals": totals,
        "tasks": ordered,
        "attempts": attempts,
        "tokens": {"prompt": tokens_in, "completion": tokens_out, "total": tokens_in + tokens_out},
        "cost_usd": round(cost, 6) if cost is not None else None,
        "by_teacher": by_teacher,
        "store": STORE_FILE,
    }


def _check_resume(out: Path, settings: dict[str, Any]) -> None:
    """Warn when a resumed run changes settings that decide which examples exist or pass."""
    path = out / RUN_FILE
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = {}
        keys = ("data", "tasks", "limit", "seed", "max_attempts", "rwjs_threshold", "duals", "build")
        changed = [k for k in keys if k in before and before[k] != settings[k]]
        if changed:
            logger.warning(
                "resuming %s with different %s than before: examples already kept or rejected stay as "
                "they are; only the others follow the new settings",
                out,
                ", ".join(changed),
            )
    _write_json(path, settings)


# -- entry points --------------------------------------------------------------------------------


async def _generate(
    config: GenerationConfig, rows: list[dict[str, Any]], store: AttemptStore, prepared: Any
) -> int:
    from cellduality.parsing import gene_vocabulary
    from cellduality.tasks.build import part_meta

    vocabularies = {
        name: gene_vocabulary(part_meta(prepared.meta, name)["genes"])
        for name in dict.fromkeys(str(r["dataset"]) for r in rows)
    }
    if config.offline:
        import numpy as np
        from datasets import DatasetDict

        from cellduality.tasks.build import PreparedTasks

        # The teacher sees the train split only, and only the tasks it will be asked about.
        train = prepared.datasets["train"]
        wanted = sorted({str(r["task"]) for r in rows})
        train = train.select(np.flatnonzero(np.isin(np.asarray(train["task"]), wanted)))
        teacher = _OfflineTeacher(
            PreparedTasks(DatasetDict({"train": train}), prepared.meta), concise=config.offline_concise
        )
        run = _Run(config, rows, store, teacher, vocabularies)
        await run.run()
        return run.cap
    client = TeacherClient(
        config.teachers, concurrency=config.concurrency, retry=config.retry, seed=config.seed
    )
    async with client:
        run = _Run(config, rows, store, _LLMTeacher(client), vocabularies)
        client.on_retry = run.retried
        await run.run()
        return run.cap


def _with_counterfactuals(
    dataset: Dataset, rows: list[dict[str, Any]], prepared: Any, config: GenerationConfig
) -> Dataset:
    """``dataset`` plus the counterfactual dual examples of ``rows`` (targets from the train split)."""
    import numpy as np
    from datasets import Dataset, DatasetDict, concatenate_datasets

    from cellduality.tasks.build import PreparedTasks
    from cellduality.teacher.counterfactual import counterfactual_examples
    from cellduality.teacher.offline import OfflineTeacher

    train = prepared.datasets["train"]
    wanted = sorted({str(r["task"]) for r in rows})
    train = train.select(np.flatnonzero(np.isin(np.asarray(train["task"]), wanted)))
    teacher = OfflineTeacher(
        PreparedTasks(DatasetDict({"train": train}), prepared.meta), concise=config.offline_concise
    )
    extra = counterfactual_examples(
        rows, train.to_list(), teacher, prepared.meta, config.seed, config.counterfactuals
    )
    if not extra:
        return dataset
    return concatenate_datasets([dataset, Dataset.from_list(extra, features=_sft_features())])


def _reasons(summary: Mapping[str, Any], state: str) -> Counter[str]:
    """How many examples ended in ``state`` (``failed`` / ``rejected``) for each reason, over all tasks."""
    counts: Counter[str] = Counter()
    for kinds in summary["tasks"].values():
        for entry in kinds.values():
            counts.update(entry[state])
    return counts


def _nothing_kept(summary: Mapping[str, Any], config: GenerationConfig, out: Path) -> NothingKeptError | None:
    """The error to stop with when no example was kept although some were asked, else ``None``.

    Why: a teacher that never answers, or answers with a proxy's HTML page, fails every example; one
    that answers with the wrong model fails none but has every answer rejected. Either way the run
    made nothing, and exit status 0 with a dataset would let the next stage train on it.
    """
    totals = summary["totals"]
    if totals["examples"] == 0 or totals["kept"] > 0:
        return None
    failed, rejected = _reasons(summary, FAILED), _reasons(summary, REJECTED)

    def listed(counts: Counter[str]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in counts.most_common())

    where = ", ".join(redact_url(e.base_url) for e in config.teachers) or "the offline teacher"
    if failed and not rejected:
        why = f"every request to the teacher failed ({listed(failed)})"
        if "malformed_response" in failed:
            check = f"that {where} is an OpenAI-compatible API and not a proxy or login page"
        else:
            check = f"that {where} answers (e.g. curl its /models) and serves the --teacher-model"
    else:
        parts = [f"rejected {listed(rejected)}"] + ([f"failed {listed(failed)}"] if failed else [])
        why = "the teacher answered, but no answer passed the checks (" + "; ".join(parts) + ")"
        check = "the --teacher-model, and the answers in " + str(out / STORE_FILE)
    return NothingKeptError(
        f"no example was kept out of {totals['examples']}: {why}; no dataset was written. Check {check}, "
        "then run the same command again"
    )


def run_generation(config: GenerationConfig) -> dict[str, Any]:
    """Generate (or resume) SFT data into ``config.out``; return the summary also written to disk.

    Writes ``attempts.jsonl`` (every attempt, as it happens), ``run.json`` (the settings),
    ``dataset/`` (a ``DatasetDict`` with a ``train`` split: the kept examples) and ``summary.json``.
    Raises ``MissingAPIKeyError`` before any request when a key variable is unset, and
    :class:`TeacherUnavailableError` when the teacher keeps failing, and :class:`NothingKeptError` when
    no example was kept (both after writing the summary; the dataset is then not written, so nothing
    downstream mistakes a broken run for a finished one).
    """
    started = time.monotonic()
    out = Path(config.out)
    if config.teachers:
        TeacherClient(config.teachers, concurrency=config.concurrency).check_credentials()
    prepared = load_sources(config)
    if "train" not in prepared.datasets:
        from cellduality.data.schema import DataError

        raise DataError(f"the data have no train split (splits: {', '.join(prepared.datasets)})")
    train = prepared.datasets["train"]
    indices = select_rows(train, config.tasks, config.limit, config.seed)
    rows = train.select(indices).to_list() if indices else []
    out.mkdir(parents=True, exist_ok=True)
    if config.offline:
        logger.info("no teacher endpoint given: using the offline teacher (statistics of the train split)")
    with AttemptStore(out / STORE_FILE, sync_interval_s=config.sync_interval_s) as store:
        _check_resume(out, config.settings())
        cap = 1 if config.offline else config.max_attempts
        error: BaseException | None = None
        try:
            cap = run_coroutine(_generate(config, rows, store, prepared), name="sft-data")
        except TeacherUnavailableError as exc:
            error = exc
        summary = build_summary(rows, store, config, cap)
        if error is None:
            error = _nothing_kept(summary, config, out)
        if error is None:
            dataset = build_dataset(rows, store, config.seed)
            if config.duals and config.counterfactuals > 0 and rows:
                dataset = _with_counterfactuals(dataset, rows, prepared, config)
            _save_dataset(dataset, out)
            kinds = Counter(dataset["kind"]) if len(dataset) else Counter()
            summary["dataset"] = {
                "path": DATASET_DIR,
                "rows": len(dataset),
                "forward": kinds.get(FORWARD, 0),
                "dual": kinds.get(DUAL, 0),
                "counterfactual": kinds.get("counterfactual", 0),
            }
        else:
            summary["dataset"] = None
            summary["stopped"] = str(error)
        summary["elapsed_s"] = round(time.monotonic() - started, 3)
        _write_json(out / SUMMARY_FILE, summary)
    if error is not None:
        raise error
    return summary


def load_sft_dataset(folder: str | os.PathLike[str]) -> DatasetDict:
    """The SFT examples written by ``run_generation`` (``folder`` = its ``out``, or the dataset itself)."""
    from datasets import load_from_disk

    path = Path(folder)
    if (path / "dataset_dict.json").exists():
        return load_from_disk(str(path))
    if not (path / DATASET_DIR).exists():
        if (path / STORE_FILE).exists():
            raise FileNotFoundError(
                f"{path} has attempts but no finished dataset: its generation stopped early; run the same "
                "`cellduality sft-data` command again to resume and finish it"
            )
        raise FileNotFoundError(
            f"{path} holds no SFT data; make them with `cellduality sft-data --out {path}`"
        )
    return load_from_disk(str(path / DATASET_DIR))
