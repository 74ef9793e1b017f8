"""SFT data generation (``cellduality sft-data``) against a real local OpenAI-compatible server.

The teacher is ``tests/openai_server.py`` driven through the real ``openai`` client: a scripted reply
reads the prompt, finds the example it belongs to and answers right, wrong, off the candidate list or
malformed (a pure function of the prompt, so a resumed run sees the same answers), while faults
(429 with Retry-After, 500, slow replies beyond the timeout, broken bodies, dropped connections) are
injected. Nothing reaches the network. Data: 20 train cells per task of the embedded pbmc68k.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest

from cellduality.parsing import gene_vocabulary, parse_completion, parse_genes, parse_label
from cellduality.tasks import TaskConfig, build_tasks, dual_prompt, load_prepared, save_prepared
from cellduality.teacher import MissingAPIKeyError, RetryPolicy, TeacherEndpoint
from cellduality.teacher.command import add_parser, config_from_args, endpoints_from_args, main
from cellduality.teacher.filters import (
    LOW_RWJS,
    MALFORMED,
    NO_GENES,
    NO_REASONING,
    NOT_A_CANDIDATE,
    WRONG_LABEL,
    judge,
)
from cellduality.teacher.pipeline import (
    STORE_FILE,
    SUMMARY_FILE,
    GenerationConfig,
    NothingKeptError,
    TeacherUnavailableError,
    load_sft_dataset,
    run_generation,
    select_rows,
)
from cellduality.teacher.prompts import DUAL, FORWARD, load_template, teacher_messages

try:
    from openai_server import Fault, OpenAITestServer
except ModuleNotFoundError:  # tests/ became a package
    from tests.openai_server import Fault, OpenAITestServer

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-sftdata-FAKE-KEY-3b9e51d07c"
KEY_ENV = "CELLDUALITY_TEST_SFT_KEY"
FAST = RetryPolicy(max_tries=4, backoff_base_s=0.01, backoff_max_s=0.05, retry_after_cap_s=1.0)


# -- data and the scripted teacher ---------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared_dir(pbmc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft_prepared") / "pbmc"
    save_prepared(build_tasks(pbmc, config=TaskConfig(top_k=12, max_examples=20)), out)
    return out


@pytest.fixture(scope="module")
def train_rows(prepared_dir: Path) -> list[dict]:
    return load_prepared(prepared_dir).datasets["train"].to_list()


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def behaviour(row_id: str, kind: str) -> str:
    """How the scripted teacher answers an example: a pure function of its id."""
    bucket = zlib.crc32(f"{row_id}/{kind}".encode()) % 10
    return {0: "wrong", 1: "malformed", 2: "off"}.get(bucket, "right")


class Script:
    """Answers the prompts of a prepared train split like a (fallible) teacher would.

    Prompts are recognised by their user message. Generation prompts are shared by every cell of a
    type, so the reply for such a prompt follows its first cell; the tests judge expected outcomes
    per example with the same reply.
    """

    def __init__(self, rows: list[dict], seed: int = 0, flip_first: bool = False) -> None:
        self.by_prompt: dict[str, tuple[dict, str]] = {}
        self.vocab = sorted({g for r in rows for g in r["cell_genes"] + r["answer"].split()})
        for row in rows:
            self.by_prompt.setdefault(row["prompt"][-1]["content"], (row, FORWARD))
            self.by_prompt.setdefault(dual_prompt(row, row["answer"], seed)[-1]["content"], (row, DUAL))
        self.flip_first = flip_first  # stateful variant: wrong the first time a prompt is seen
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.unknown = 0

    def text_for(self, user: str) -> str:
        found = self.by_prompt.get(user)
        if found is None:
            with self.lock:
                self.unknown += 1
            return "I do not recognise this question."
        row, kind = found
        how = behaviour(row["id"], kind)
        if self.flip_first:
            with self.lock:
                self.seen[user] += 1
                how = "wrong" if self.seen[user] == 1 else "right"
        return self.answer(row, kind, how)

    def answer(self, row: dict, kind: str, how: str) -> str:
        label_task = (row["task"] == "annotation") == (kind == FORWARD)
        if how == "malformed":
            return "The answer is obvious from the markers."
        if label_task:
            truth = row["answer"] if kind == FORWARD else row["condition"]
            if how == "right":
                # a sloppy but matching spelling: the kept completion must carry the exact label
                shown = f"{truth.lower()}." if zlib.crc32(row["id"].encode()) % 2 else truth
            elif how == "wrong":
                shown = next(c for c in row["candidates"] if c != truth)
            else:
                shown = "Unicorn cell"
            return f"<think>Markers point to {shown}.</think><answer>{shown}</answer>"
        reference = row["answer"].split() if kind == FORWARD else list(row["hidden_genes"])
        if how == "right":
            genes = reference
        elif how == "wrong":
            genes = [g for g in self.vocab if g not in set(reference)][: len(reference)]
        else:
            genes = ["notagene1", "notagene2"]
        return f"<think>Highly expressed genes of such a cell.</think><answer>{' '.join(genes)}</answer>"

    def __call__(self, messages: list[dict], model: str) -> str:
        return self.text_for(messages[-1]["content"])


def expected_outcomes(rows: list[dict], script: Script, threshold: float = 0.3) -> dict[str, bool]:
    """example id -> kept, for every example the plan will ask (duals only after a kept forward)."""
    vocab = gene_vocabulary({g for r in rows for g in r["cell_genes"] + r["answer"].split()})
    out: dict[str, bool] = {}
    for row in rows:
        forward = judge(row, FORWARD, script.text_for(row["prompt"][-1]["content"]), vocabulary=vocab)
        out[f"{row['id']}/forward"] = forward.kept
        if forward.kept:
            user = dual_prompt(row, row["answer"], 0)[-1]["content"]
            out[f"{row['id']}/dual"] = judge(row, DUAL, script.text_for(user), vocabulary=vocab).kept
    return out


def endpoint(server: OpenAITestServer, **kw) -> TeacherEndpoint:
    kw.setdefault("timeout_s", 5.0)
    return TeacherEndpoint(base_url=server.base_url, model="teacher-a", api_key_env=KEY_ENV, **kw)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_counts_add_up(summary: dict) -> None:
    totals = Counter()
    for kinds in summary["tasks"].values():
        for entry in kinds.values():
            settled = entry["kept"] + sum(entry["rejected"].values()) + sum(entry["failed"].values())
            assert entry["examples"] == settled + entry["pending"], entry
            totals.update(
                examples=entry["examples"],
                kept=entry["kept"],
                rejected=sum(entry["rejected"].values()),
                failed=sum(entry["failed"].values()),
                pending=entry["pending"],
            )
    assert {k: totals[k] for k in summary["totals"]} == summary["totals"]


def assert_no_secret(folder: Path, secret: str = SECRET) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


# -- the filters and the teacher prompt ----------------------------------------------------------


def test_filters_keep_only_checkable_right_answers() -> None:
    row = {
        "id": "d/annotation/train/c1",
        "task": "annotation",
        "answer": "CD14+ Monocyte",
        "candidates": ["CD14+ Monocyte", "CD19+ B"],
        "visible_genes": ["LYZ", "S100A9"],
        "hidden_genes": ["CD14", "FCN1", "S100A8"],
    }
    vocab = gene_vocabulary(["LYZ", "S100A9", "CD14", "FCN1", "S100A8", "ACTB"])

    def verdict(text: str, kind: str = FORWARD, **kw):
        return judge(row, kind, text, vocabulary=vocab, **kw)

    assert verdict("CD14+ Monocyte").reason == MALFORMED
    assert verdict("<answer>CD14+ Monocyte</answer>").reason == MALFORMED
    assert verdict("<think>x</think><answer>a</answer> trailing words").reason == MALFORMED
    assert verdict("<think> </think><answer>CD14+ Monocyte</answer>").reason == NO_REASONING
    assert verdict("<think>x</think><answer>Neutrophil</answer>").reason == NOT_A_CANDIDATE
    wrong = verdict("<think>x</think><answer>CD19+ B</answer>")
    assert (wrong.kept, wrong.reason, wrong.score) == (False, WRONG_LABEL, 0.0)
    right = verdict("<think>LYZ and S100A9 lead.</think><answer> cd14+ monocyte. </answer>")
    assert right.kept and right.score == 1.0
    assert right.completion == "<think>LYZ and S100A9 lead.</think><answer>CD14+ Monocyte</answer>"

    # the in-painting dual: RWJS against the hidden genes, after the contract's cleaning
    assert verdict("<think>x</think><answer>foo bar</answer>", DUAL).reason == NO_GENES
    low = verdict("<think>x</think><answer>ACTB LYZ S100A8</answer>", DUAL)
    assert (low.kept, low.reason) == (False, LOW_RWJS) and 0 < low.score < 0.3
    good = verdict("<think>x</think><answer>cd14 FCN1 notagene CD14 S100A8 ACTB</answer>", DUAL)
    assert good.kept and good.score == 1.0 and good.answer == "CD14 FCN1 S100A8"
    assert verdict("<think>x</think><answer>ACTB LYZ S100A8</answer>", DUAL, rwjs_threshold=0.05).kept

    # the reconstruction dual of generation: exactly the prompted condition
    gen = {"id": "g", "task": "generation", "answer": "LYZ CD14 FCN1", "n_genes": 3, "condition": "CD19+ B"}
    gen["candidates"] = row["candidates"]
    assert judge(gen, DUAL, "<think>x</think><answer>CD19+ B</answer>").kept
    assert judge(gen, DUAL, "<think>x</think><answer>CD14+ Monocyte</answer>").reason == WRONG_LABEL
    fwd = judge(gen, FORWARD, "<think>x</think><answer>LYZ CD14 FCN1 EXTRA</answer>", vocabulary=vocab)
    assert fwd.kept and fwd.score == 1.0 and fwd.answer == "LYZ CD14 FCN1"  # truncated to n_genes


def test_teacher_prompt_comes_from_package_templates(train_rows: list[dict]) -> None:
    row = next(r for r in train_rows if r["task"] == "annotation")
    messages = teacher_messages(row["prompt"], "annotation", FORWARD)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1] == row["prompt"][-1]  # the task's question, untouched
    system = messages[0]["content"]
    assert system.startswith(load_template("system")) and load_template("classification") in system
    assert "<think>" in system and "<answer>" in system and row["prompt"][0]["content"] not in system
    notes = {
        ("annotation", DUAL): "inpainting",
        ("generation", FORWARD): "generation",
        ("perturbation", DUAL): "reconstruction",
        ("drug_sensitivity", FORWARD): "classification",
    }
    for (task, kind), note in notes.items():
        assert load_template(note) in teacher_messages(row["prompt"], task, kind)[0]["content"]


def test_limit_is_a_seeded_prefix(prepared_dir: Path) -> None:
    train = load_prepared(prepared_dir).datasets["train"]
    small, large = select_rows(train, None, 5, seed=3), select_rows(train, None, 12, seed=3)
    tasks = Counter(train[i]["task"] for i in small)
    assert tasks == {"annotation": 5, "generation": 5}
    assert set(small) <= set(large) and small != select_rows(train, None, 5, seed=4)
    assert select_rows(train, ["generation"], None, 0) == [
        i for i, t in enumerate(train["task"]) if t == "generation"
    ]


# -- an LLM teacher over HTTP --------------------------------------------------------------------


def test_llm_teacher_with_faults_every_example_ends_kept_or_rejected(
    key: str, prepared_dir: Path, train_rows: list[dict], tmp_path: Path
) -> None:
    script = Script(train_rows)
    doomed = next(
        r for r in train_rows if r["task"] == "annotation" and behaviour(r["id"], FORWARD) == "right"
    )
    doomed_prompt = doomed["prompt"][-1]["content"]

    def fault_fn(request):  # one example's endpoint is broken for good
        return Fault.server_error(500) if request.messages[-1]["content"] == doomed_prompt else None

    with OpenAITestServer(reply=script, fault_fn=fault_fn) as server:
        server.inject(
            Fault.rate_limit(retry_after="0.2"),
            Fault.server_error(500, echo_authorization=True),
            Fault.slow(3.0),
            Fault.invalid_json(),
            Fault.empty_content(),
            Fault.drop(),
        )
        out = tmp_path / "sft"
        config = GenerationConfig(
            data=str(prepared_dir),
            out=out,
            teachers=[endpoint(server, timeout_s=0.5, price_in_per_mtok=1.0, price_out_per_mtok=4.0)],
            concurrency=4,
            max_attempts=2,
            retry=FAST,
            progress=False,
        )
        summary = run_generation(config)
        requests = list(server.requests)
        server.fault_fn = None  # the endpoint recovers: the next run retries the failed example only
        server.reset_stats()
        retried = run_generation(config)
        assert {r.messages[-1]["content"] for r in server.requests} <= {
            doomed_prompt,
            dual_prompt(doomed, doomed["answer"], 0)[-1]["content"],
        }

    assert script.unknown == 0
    statuses = Counter(r.status for r in requests)
    assert statuses[429] >= 1 and statuses[500] >= 1 and statuses[0] >= 1  # the faults were served
    # our teacher prompt went out, sampled at temperature > 0 (retries can differ)
    assert all(r.messages[0]["content"].startswith(load_template("system")) for r in requests)
    assert all(r.body["temperature"] > 0 for r in requests)

    assert_counts_add_up(summary)
    assert not summary["complete"] and summary["totals"]["pending"] == 0  # the failed one is retried next run
    expected = expected_outcomes(train_rows, script)
    expected[f"{doomed['id']}/forward"] = False
    expected.pop(f"{doomed['id']}/dual", None)
    assert summary["totals"]["examples"] == len(expected)
    assert summary["totals"]["kept"] == sum(expected.values())
    assert summary["totals"]["failed"] == 1
    assert summary["tasks"]["annotation"]["forward"]["failed"] == {"http_500": 1}
    reasons = Counter()
    for kinds in summary["tasks"].values():
        for entry in kinds.values():
            reasons.update(entry["rejected"])
    assert {WRONG_LABEL, MALFORMED, NOT_A_CANDIDATE, LOW_RWJS, NO_GENES} <= set(reasons)

    # after the retry, the dataset holds exactly the kept examples, in the completion format with
    # canonical answers
    expected = expected_outcomes(train_rows, script)
    assert retried["complete"] and retried["totals"]["kept"] == sum(expected.values())
    train = load_sft_dataset(out)["train"]
    assert set(train["kind"]) >= {"counterfactual"}  # made from the train split, whatever the teacher did
    train = train.filter(lambda ex: ex["kind"] != "counterfactual")
    assert sorted(train["id"]) == sorted(i for i, kept in expected.items() if kept)
    assert set(train.column_names) >= {"id", "task", "kind", "prompt", "completion", "teacher"}
    by_id = {r["id"]: r for r in train_rows}
    for ex in train:
        row = by_id[ex["id"].rsplit("/", 1)[0]]
        text = ex["completion"][0]["content"]
        assert ex["completion"][0]["role"] == "assistant" and parse_completion(text).well_formed
        assert ex["teacher"] == "teacher-a" and ex["prompt"][0]["role"] == "system"
        if ex["kind"] == FORWARD:
            assert ex["prompt"] == row["prompt"]
            if ex["task"] == "annotation":
                assert parse_completion(text).answer == row["answer"]  # exact label, not "cd14+ ...."
        else:
            assert ex["prompt"] == dual_prompt(row, row["answer"], 0)

    # every attempt is on disk once; tokens and cost come from the server's usage
    lines = read_lines(out / STORE_FILE)
    assert len(lines) == retried["attempts"]["total"] > summary["attempts"]["total"]
    assert len({(x["example_id"], x["attempt"]) for x in lines}) == len(lines)
    assert 0 < summary["tokens"]["total"] < retried["tokens"]["total"]  # spend so far, both runs
    assert retried["tokens"]["prompt"] == sum(x["prompt_tokens"] or 0 for x in lines)
    assert retried["cost_usd"] == pytest.approx(
        sum((x["prompt_tokens"] or 0) * 1.0 + (x["completion_tokens"] or 0) * 4.0 for x in lines) / 1e6
    )
    assert retried["complete"] and retried["totals"]["kept"] == sum(
        expected_outcomes(train_rows, script).values()
    )
    assert json.loads((out / SUMMARY_FILE).read_text())["totals"] == retried["totals"]
    assert_no_secret(out)


def test_concurrency_limit_holds(
    key: str, prepared_dir: Path, train_rows: list[dict], tmp_path: Path
) -> None:
    with OpenAITestServer(reply=Script(train_rows), latency_s=0.05) as server:
        config = GenerationConfig(
            data=str(prepared_dir),
            out=tmp_path / "sft",
            limit=8,
            teachers=[endpoint(server)],
            concurrency=3,
            max_attempts=1,
            retry=FAST,
            progress=False,
        )
        summary = run_generation(config)
        assert server.max_in_flight == 3  # never above the limit, and the limit was used
        assert summary["attempts"]["total"] == len(server.requests) > 3


def test_rejected_answers_are_asked_again(
    key: str, prepared_dir: Path, train_rows: list[dict], tmp_path: Path
) -> None:
    # annotation only: its prompts (and in-painting duals) are unique per cell, so "wrong the first
    # time a prompt is seen" is wrong on attempt 0 of every example
    base = {"data": str(prepared_dir), "tasks": ["annotation"], "limit": 4, "progress": False}
    nothing_kept = pytest.raises(NothingKeptError, match="no answer passed the checks")  # no dataset
    with OpenAITestServer(reply=Script(train_rows, flip_first=True)) as server, nothing_kept:
        run_generation(
            GenerationConfig(out=tmp_path / "once", teachers=[endpoint(server)], max_attempts=1, **base)
        )
    once = json.loads((tmp_path / "once" / SUMMARY_FILE).read_text())
    assert once["dataset"] is None and once["totals"] == {
        "examples": 4,
        "kept": 0,
        "rejected": 4,
        "failed": 0,
        "pending": 0,
    }  # no duals
    with OpenAITestServer(reply=Script(train_rows, flip_first=True)) as server:
        twice = run_generation(
            GenerationConfig(out=tmp_path / "twice", teachers=[endpoint(server)], max_attempts=3, **base)
        )
        assert len(server.requests) == 16
    assert twice["totals"] == {"examples": 8, "kept": 8, "rejected": 0, "failed": 0, "pending": 0}
    lines = read_lines(tmp_path / "twice" / STORE_FILE)
    assert Counter((x["attempt"], x["status"], x["reason"]) for x in lines) == {
        (0, "rejected", WRONG_LABEL): 4,
        (0, "rejected", LOW_RWJS): 4,
        (1, "kept", None): 8,
    }


def test_kill_at_any_moment_then_resume_gives_the_same_dataset(
    key: str, prepared_dir: Path, train_rows: list[dict], tmp_path: Path
) -> None:
    out_killed, out_clean = tmp_path / "killed", tmp_path / "clean"
    with OpenAITestServer(reply=Script(train_rows), latency_s=0.03) as server:
        command = [
            sys.executable,
            str(REPO / "sft_data" / "generate.py"),
            "--data",
            str(prepared_dir),
            "--out",
            str(out_killed),
            "--teacher-base-url",
            server.base_url,
            "--teacher-model",
            "teacher-a",
            "--api-key-env",
            KEY_ENV,
            "--concurrency",
            "2",
            "--max-attempts",
            "2",
            "--no-progress",
        ]
        env = {**os.environ, KEY_ENV: SECRET}
        store = out_killed / STORE_FILE
        logs = []
        for kill_at in (10, 40):  # kill twice, mid-run, with SIGKILL: no handler, no flush, no cleanup
            proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if store.exists() and store.read_bytes().count(b"\n") >= kill_at:
                    break
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
            logs.append(proc.communicate()[0])
            assert proc.returncode == -signal.SIGKILL, logs[-1].decode()[-2000:]
            assert not (out_killed / "dataset").exists()
        finished = subprocess.run(command, env=env, capture_output=True, timeout=120)
        assert finished.returncode == 0, finished.stderr.decode()[-2000:]
        logs += [finished.stdout, finished.stderr]

        clean = run_generation(
            GenerationConfig(
                data=str(prepared_dir),
                out=out_clean,
                teachers=[endpoint(server, timeout_s=120.0)],
                concurrency=2,
                max_attempts=2,
                progress=False,
            )
        )
    resumed = json.loads((out_killed / SUMMARY_FILE).read_text())
    assert resumed["totals"] == clean["totals"] and resumed["tasks"] == clean["tasks"]
    assert load_sft_dataset(out_killed)["train"].to_list() == load_sft_dataset(out_clean)["train"].to_list()
    lines = read_lines(out_killed / STORE_FILE)
    keys = [(x["example_id"], x["attempt"]) for x in lines]
    assert len(keys) == len(set(keys))  # nothing asked twice under the same attempt
    kept = Counter(x["example_id"] for x in lines if x["status"] == "kept")
    assert max(kept.values()) == 1
    attempts: dict[str, list[int]] = {}
    for example, attempt in keys:
        attempts.setdefault(example, []).append(attempt)
    assert all(sorted(a) == list(range(len(a))) for a in attempts.values())
    assert_no_secret(out_killed)
    assert not any(SECRET.encode() in log for log in logs)


def test_missing_key_fails_before_any_request(
    monkeypatch: pytest.MonkeyPatch, prepared_dir: Path, tmp_path: Path, capsys
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with OpenAITestServer() as server:
        config = GenerationConfig(data=str(prepared_dir), out=tmp_path / "x", teachers=[endpoint(server)])
        with pytest.raises(MissingAPIKeyError, match=KEY_ENV):
            run_generation(config)
        argv = ["--data", str(prepared_dir), "--out", str(tmp_path / "y"), "--teacher-base-url"]
        argv += [server.base_url, "--teacher-model", "m", "--api-key-env", KEY_ENV]
        assert main(argv) == 2
        assert server.requests == []
    assert KEY_ENV in capsys.readouterr().err


def test_a_bad_key_stops_the_run_without_a_dataset(key: str, prepared_dir: Path, tmp_path: Path) -> None:
    with OpenAITestServer(fault_fn=lambda request: Fault.status_code(401)) as server:
        out = tmp_path / "sft"
        config = GenerationConfig(
            data=str(prepared_dir), out=out, teachers=[endpoint(server)], retry=FAST, progress=False
        )
        with pytest.raises(TeacherUnavailableError, match="http_401"):
            run_generation(config)
        assert len(server.requests) <= config.concurrency * 2  # stopped, not 40 examples x 4 attempts
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["dataset"] is None and not summary["complete"] and "http_401" in summary["stopped"]
    assert_counts_add_up(summary)
    with pytest.raises(FileNotFoundError, match="resume"):
        load_sft_dataset(out)


def test_a_wedged_teacher_stops_the_run_like_a_down_one(
    key: str, prepared_dir: Path, tmp_path: Path, capsys
) -> None:
    """A teacher that accepts connections and never answers ends the run with the message a server that
    is down gives (the CLI's "stopped: the teacher keeps failing ..."), soon, with the retries shown."""
    with OpenAITestServer() as down:
        down_url = down.base_url  # closed at once: nothing listens there
    messages = {}
    with OpenAITestServer(hang=True) as wedged:
        for name, url in (("down", down_url), ("wedged", wedged.base_url)):
            argv = ["--data", str(prepared_dir), "--out", str(tmp_path / name), "--teacher-base-url", url]
            argv += [
                "--teacher-model",
                "m",
                "--api-key-env",
                KEY_ENV,
                "--concurrency",
                "4",
                "--max-tries",
                "2",
            ]
            argv += ["--first-byte-timeout", "0.5", "--probe-timeout", "0.5", "--no-progress"]
            assert main(argv) == 1
            messages[name] = capsys.readouterr().err
        held = list(wedged.held)
    for name, reason in (("down", "connection_error"), ("wedged", "no_response")):
        err = messages[name]
        assert f"stopped: the teacher keeps failing ({reason}" in err, err
        assert "run the same command again to resume" in err and "Traceback" not in err
    assert "not responding" in messages["wedged"]
    # soon, counted rather than timed: the run stopped after the first round of requests (4 in flight),
    # each ended by the 0.5 s first-byte check ("no_response", not the long total timeout), so the other
    # examples were never sent
    posts = [h for h in held if h.startswith("POST")]
    assert 1 <= len(posts) <= 4, held


def test_retries_show_in_the_progress_line(key: str, prepared_dir: Path, tmp_path: Path) -> None:
    from cellduality.teacher.pipeline import _Run

    shown: list[str] = []
    original = _Run._postfix

    def spy(self) -> None:
        original(self)
        shown.append(str(self.bar.postfix))

    with OpenAITestServer() as server:
        server.inject(Fault.server_error(), Fault.server_error())
        config = GenerationConfig(
            data=str(prepared_dir),
            out=tmp_path / "o",
            teachers=[endpoint(server)],
            retry=FAST,
            limit=1,
            tasks=["annotation"],
            duals=False,
            progress=True,
        )
        try:
            _Run._postfix = spy
            with pytest.raises(NothingKeptError):  # the echoed prompt is no candidate: rejected
                run_generation(config)
        finally:
            _Run._postfix = original
    assert any("retries=1 (http_500, try 2)" in line for line in shown), shown
    assert any("retries=2" in line for line in shown)


# -- the offline teacher and the SFT entry point -------------------------------------------------


def test_offline_teacher_on_pbmc68k_feeds_the_sft_entry(
    pbmc, prepared_dir: Path, train_rows: list[dict], tmp_path: Path
) -> None:
    from cellduality.train.configs import CellDualityArguments, SFTDataArguments
    from cellduality.train.sft import sft_examples

    training_args = SimpleNamespace(
        output_dir=str(tmp_path / "run"),
        process_index=0,
        seed=0,
        main_process_first=lambda local=True, desc="work": nullcontext(),  # TrainingArguments signature
    )
    prepared = load_prepared(prepared_dir)
    train = sft_examples(CellDualityArguments(tasks=None), SFTDataArguments(), prepared, training_args)
    folder = tmp_path / "run" / "sft_data"
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    assert summary["teacher"] == "offline" and summary["tokens"]["total"] == 0
    assert_counts_add_up(summary)
    kinds = Counter((t, k) for t, k in zip(train["task"], train["kind"], strict=True))
    for task in ("annotation", "generation"):
        for kind in (FORWARD, DUAL):
            assert kinds[task, kind] > 0, kinds
    n_cf = summary["dataset"]["counterfactual"]
    assert n_cf > 0 and len(train) == summary["totals"]["kept"] + n_cf == summary["dataset"]["rows"]
    assert set(train["teacher"]) == {"offline", "counterfactual"}
    vocab = gene_vocabulary(prepared.genes)
    by_id = {r["id"]: r for r in train_rows}
    answers = {r["answer"]: r["condition"] for r in train_rows if r["task"] == "generation"}
    for ex in train:
        text = ex["completion"][0]["content"]
        assert parse_completion(text).well_formed
        if ex["kind"] == "counterfactual":
            # the dual asked with a wrong forward answer, answered from the training data
            row = by_id[ex["id"].split("/counterfactual/")[0]]
            prompt = ex["prompt"][-1]["content"]
            if ex["task"] == "annotation":
                named = [c for c in row["candidates"] if f" {c} cell" in prompt]
                assert named and row["answer"] not in named
                assert len(parse_genes(text, vocab)) > 0
            else:  # a real training cell of another type, named by its true type
                shown = next(a for a in answers if a in prompt)
                assert parse_label(text, row["candidates"]) == answers[shown] != row["condition"]
            continue
        row = by_id[ex["id"].rsplit("/", 1)[0]]  # only train rows: the test split is never used
        if (ex["task"], ex["kind"]) in (("annotation", FORWARD), ("generation", DUAL)):
            truth = row["answer"] if ex["kind"] == FORWARD else row["condition"]
            assert parse_label(text, row["candidates"]) == truth
        else:
            assert len(parse_genes(text, vocab)) > 0 and ex["score"] >= 0.3

    # a second run finds everything done: no new attempt, the same dataset
    store = folder / STORE_FILE
    before = store.read_bytes()
    written = {p: p.stat().st_mtime_ns for p in (folder / "dataset").rglob("*") if p.is_file()}
    again = run_generation(
        GenerationConfig(data=str(tmp_path / "run" / "prepared"), out=folder, progress=False)
    )
    assert store.read_bytes() == before and again["totals"] == summary["totals"]
    assert load_sft_dataset(folder)["train"].to_list() == train.to_list()
    # ... written once: the second run rewrote nothing and set nothing aside
    arrow = {p: p.stat().st_mtime_ns for p in (folder / "dataset").rglob("*") if p.is_file()}
    assert arrow == written and not (folder / "previous").exists()

    # nothing an earlier run made is deleted: an interrupted run's temporary folder stays byte for byte,
    # and a dataset whose rows differ from this run's (here: marked as another version's) is set aside
    stale = folder / ".dataset.tmp"
    stale.mkdir()
    (stale / "half-written.arrow").write_bytes(b"\x00partial")
    (folder / "dataset" / "cellduality-rows.sha256").write_text("0" * 64 + "\n")
    run_generation(GenerationConfig(data=str(tmp_path / "run" / "prepared"), out=folder, progress=False))
    assert (stale / "half-written.arrow").read_bytes() == b"\x00partial"
    (aside,) = (folder / "previous").iterdir()
    assert {p.relative_to(aside) for p in aside.rglob("*") if p.is_file()} == {
        p.relative_to(folder / "dataset") for p in arrow
    }
    assert load_sft_dataset(folder)["train"].to_list() == train.to_list()


# -- the command line ----------------------------------------------------------------------------


def test_cli_flags_build_the_teacher_mixture(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="cellduality")
    add_parser(parser.add_subparsers(dest="command"))
    argv = ["sft-data", "--data", "a", "--data", "pbmc68k", "--out", str(tmp_path), "--tasks", "annotation"]
    argv += ["--teacher-base-url", "http://127.0.0.1:9/v1", "--teacher-model", "big", "--teacher-weight", "3"]
    argv += ["--teacher-model", "small", "--teacher-weight", "1", "--api-key-env", "none"]
    argv += ["--price-in", "2", "--price-out", "8", "--limit", "5", "--rwjs-threshold", "0.4"]
    args = parser.parse_args(argv)
    assert args.func.__name__ == "cmd_sft_data"
    config = config_from_args(args)
    assert config.data == ["a", "pbmc68k"] and config.tasks == ["annotation"] and config.limit == 5
    assert config.rwjs_threshold == 0.4 and config.max_attempts == 4 and not config.offline
    big, small = config.teachers
    assert (big.model, big.weight, small.model, small.weight) == ("big", 3.0, "small", 1.0)
    assert big.api_key_env is None and small.price_out_per_mtok == 8.0
    assert config.settings()["teachers"][0]["endpoint"] == "http://127.0.0.1:9/v1"

    offline = parser.parse_args(["sft-data", "--data", "a", "--out", str(tmp_path)])
    assert endpoints_from_args(offline) == [] and config_from_args(offline).offline
    for bad in (
        ["--teacher-model", "m"],  # no URL
        ["--teacher-base-url", "http://h/v1"],  # no model
        [
            "--teacher-base-url",
            "http://h/v1",
            "--teacher-model",
            "m",
            "--teacher-weight",
            "1",
            "--teacher-weight",
            "2",
        ],
        ["--teacher-base-url", "http://h/v1", "--teacher-model", "m", "--price-in", "1"],
    ):
        with pytest.raises(ValueError):
            endpoints_from_args(parser.parse_args(["sft-data", "--data", "a", "--out", "o", *bad]))


def test_script_help_and_light_imports() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "sft_data" / "generate.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--teacher-model" in result.stdout and "--api-key-env" in result.stdout
    probe = "import sys, cellduality.teacher.command; print(sorted({'datasets', 'numpy', 'openai'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "[]"  # `cellduality --help` stays instant


# -- a run that kept nothing ---------------------------------------------------------------------


def _cli_argv(prepared_dir: Path, out: Path, url: str) -> list[str]:
    argv = ["--data", str(prepared_dir), "--out", str(out), "--teacher-base-url", url]
    argv += ["--teacher-model", "m", "--api-key-env", KEY_ENV, "--tasks", "annotation", "--limit", "2"]
    return [*argv, "--max-attempts", "1", "--max-tries", "1", "--no-duals", "--no-progress"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("html", "every request to the teacher failed (malformed_response: 2)"),
        ("wedged", "every request to the teacher failed (no_response: 2)"),
        ("all wrong", "no answer passed the checks (rejected malformed: 2)"),
    ],
)
def test_a_run_that_kept_nothing_exits_non_zero_without_a_dataset(
    case: str, expected: str, key: str, prepared_dir: Path, tmp_path: Path, capsys
) -> None:
    """Too few failures to stop the run early (2 examples), yet nothing kept: before, exit 0 and a dataset."""
    html = Fault(body=b"<!DOCTYPE html><html><body>Please sign in</body></html>")
    server = {
        "html": OpenAITestServer(fault_fn=lambda request: html),
        "wedged": OpenAITestServer(hang=True),
        "all wrong": OpenAITestServer(reply=lambda messages, model: "I would rather not say."),
    }[case]
    out = tmp_path / "sft"
    with server:
        argv = _cli_argv(prepared_dir, out, server.base_url)
        argv += ["--first-byte-timeout", "0.5", "--probe-timeout", "0.5"]
        assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "sft-data:" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "cellduality sft-data: stopped: no example was kept out of 2"
    )
    assert expected in lines[0] and "no dataset was written" in lines[0], lines[0]
    assert "saved to" not in err and "Traceback" not in err
    assert not (out / "dataset").exists()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["dataset"] is None and "no example was kept" in summary["stopped"]
    with pytest.raises(FileNotFoundError, match="no finished dataset"):
        load_sft_dataset(out)
    if case == "html":  # the stored reason says what the reply was
        assert "HTML page" in read_lines(out / STORE_FILE)[0]["extra"]["detail"]


def test_one_kept_example_is_a_dataset(
    key: str, prepared_dir: Path, train_rows: list[dict], tmp_path: Path
) -> None:
    """The refusal is for nothing kept, not for some failures: one right answer makes a dataset (exit 0)."""
    first = next(r for r in train_rows if r["task"] == "annotation")
    script = Script(train_rows)

    def reply(messages: list[dict], model: str) -> str:
        found = script.by_prompt.get(messages[-1]["content"])
        if found is not None and found[0]["id"] == first["id"]:
            return script.answer(found[0], FORWARD, "right")
        return "no idea"

    with OpenAITestServer(reply=reply) as server:
        config = GenerationConfig(
            data=str(prepared_dir), out=tmp_path / "one", teachers=[endpoint(server)], retry=FAST,
            tasks=["annotation"], duals=False, max_attempts=1, progress=False,
        )  # fmt: skip
        summary = run_generation(config)
    assert summary["totals"]["kept"] == 1 and summary["dataset"]["forward"] == 1
    assert len(load_sft_dataset(tmp_path / "one")["train"]) == 1


def test_sft_refuses_a_stopped_sft_data_folder(tmp_path: Path) -> None:
    """`cellduality sft --sft_data X` where `sft-data` stopped: a one-line DataError, and the offline teacher
    does not finish the hosted teacher's run in the user's folder (before: it did)."""
    from transformers import TrainingArguments

    from cellduality.data.schema import DataError
    from cellduality.train.configs import CellDualityArguments, SFTDataArguments
    from cellduality.train.sft import sft_examples

    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / STORE_FILE).write_text("")
    training_args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[])
    with pytest.raises(DataError, match="no finished dataset: its generation stopped early"):
        sft_examples(CellDualityArguments(), SFTDataArguments(sft_data=str(stopped)), None, training_args)
    assert sorted(p.name for p in stopped.iterdir()) == [STORE_FILE]


def test_a_teacher_asking_to_wait_an_hour_gets_a_verdict(
    key: str, prepared_dir: Path, tmp_path: Path, capsys
) -> None:
    """429 with Retry-After: 3600 on every request: the run stops at the first answer (exit 1, one line
    naming the wait and the ceiling), instead of waiting the ceiling again and again."""
    with OpenAITestServer(fault_fn=lambda request: Fault.rate_limit(retry_after="3600")) as server:
        argv = [*_cli_argv(prepared_dir, tmp_path / "sft", server.base_url), "--concurrency", "1"]
        assert main([*argv, "--max-retry-wait", "60"]) == 1
        assert len(server.requests) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "sft-data:" in line]
    assert len(lines) == 1 and lines[0].startswith(
        "cellduality sft-data: stopped: the teacher is rate-limited"
    ), err
    assert "asking to wait 3600 s (Retry-After), more than the 60 s one wait may take" in lines[0]
    assert not (tmp_path / "sft" / "dataset").exists()
