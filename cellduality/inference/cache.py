"""Completions cached on disk, one JSONL file per model + dataset + split + generation settings.

Why: generating is by far the costliest part of an evaluation. Adding a model to a comparison must not
regenerate the others, and a run that crashes (out of memory, a pre-empted GPU) must keep what it had
already generated. So every batch is appended to the file and flushed before the next one starts, and a
later run only generates the entries the file does not hold yet.

One line per completion: ``{"k": entry key, "c": completion text}``. The first line of a new file is a
``{"meta": ...}`` header saying what the file holds, for humans reading the cache folder. A torn last
line (the process died mid-write) is ignored on reading. The entry key hashes the example id, the exact
prompt and the sample index, so a re-prepared dataset with new prompts under old ids never reuses a
stale completion.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def stable_hash(payload: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable payload (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def entry_key(example_id: str, prompt: Any, sample: int = 0) -> str:
    """Key of one completion: the example, a hash of its exact prompt, and which sample it is."""
    return f"{example_id}#{sample}#{stable_hash(prompt, 12)}"


def path_fingerprint(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """What identifies a model (or adapter): its files' names, sizes and modification times.

    A retrained checkpoint saved into the same folder changes its weights' mtime, so its cache entries
    are not reused; a name that is not a local folder (a hub id) is identified by the name alone.
    """
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return {"name": str(path)}
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "files": [[p.name, st.st_size, st.st_mtime_ns]]}
    files = []
    for item in sorted(p.iterdir()):
        if item.is_file() and not item.name.startswith("."):
            st = item.stat()
            files.append([item.name, st.st_size, st.st_mtime_ns])
    return {"path": str(p.resolve()), "files": files}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:60] or "model"


class CompletionCache:
    """Append-only completion store backed by one JSONL file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], meta: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.meta = dict(meta or {})
        self._entries: dict[str, str] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash: that completion is simply generated again
                if isinstance(item, dict) and "k" in item and "c" in item:
                    self._entries[str(item["k"])] = str(item["c"])

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> str | None:
        return self._entries.get(key)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys (in order, without repeats) that still have to be generated."""
        return [k for k in dict.fromkeys(keys) if k not in self._entries]

    def put_many(self, items: Iterable[tuple[str, str]]) -> None:
        """Store completions and make them durable (flush + fsync) before returning."""
        pairs = [(str(k), str(c)) for k, c in items]
        if not pairs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        with self.path.open("a", encoding="utf-8") as handle:
            if new_file and self.meta:
                handle.write(json.dumps({"meta": self.meta}, ensure_ascii=False, default=str) + "\n")
            for key, completion in pairs:
                handle.write(json.dumps({"k": key, "c": completion}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._entries.update(pairs)


def open_cache(cache_dir: str | os.PathLike[str], label: str, identity: Mapping[str, Any]) -> CompletionCache:
    """The cache file of one model + dataset + split + generation settings (``identity``).

    The file name starts with a readable slug of ``label`` and ends with a hash of ``identity``, so a
    change of any setting that alters completions opens a different file.
    """
    name = f"{_slug(label)}-{stable_hash(dict(identity))}.jsonl"
    return CompletionCache(Path(cache_dir) / name, meta={"label": label, **identity})


__all__ = ["CompletionCache", "entry_key", "open_cache", "path_fingerprint", "stable_hash"]
