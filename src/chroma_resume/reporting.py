"""What a run tells its user: structured warnings and a progress display on stderr."""
from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

import msgspec

# Warnings that mean the index content differs from what the corpus asked for.
FUNCTIONAL_WARNINGS = {"wal_ahead_of_db", "orphans_deleted", "missing_after_build", "db_ahead_of_wal",
                       "rows_differ_after_build"}


class Warnings(msgspec.Struct):
    """Counts every WARN line so RUN_FINISH can report them (DESIGN §3)."""
    stream: TextIO = sys.stderr
    count: int = 0
    functional: int = 0
    keys: dict[str, int] = msgspec.field(default_factory=dict)

    def __call__(self, key: str, **fields) -> None:
        self.count += 1
        self.functional += key in FUNCTIONAL_WARNINGS
        self.keys[key] = self.keys.get(key, 0) + 1
        detail = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        print(f"[WARN] key={key} {detail}".rstrip(), file=self.stream, flush=True)


def _quote(value) -> str:
    text = str(value)
    return repr(text) if (" " in text or not text) else text


class Progress:
    """How far a run is, shown on stderr while it works: a tqdm bar on a terminal; off a terminal (a CI
    log) a plain line at once and then every `every_sec`, never a carriage return.

    A build counts chunks whose vectors are in hand: already held by Chroma, from the cache, or out of a
    forward pass of the model (reported from the model's thread, hence the lock), so it moves while the
    model works, not only at upserts. How many chunks a build writes is known only as its documents are
    chunked, so the total is an estimate: the chunks of the documents chunked so far, plus the others at
    their mean. Rate and ETA are in chunks."""

    unit = "chunk"
    label = "[PROGRESS]"
    estimated = True  # the total is an estimate (shown as ~N)

    def __init__(self, total_docs: int, mode: str = "auto", stream: TextIO = sys.stderr, every_sec: float = 10.0):
        self.total_docs = total_docs
        self.stream = stream
        self.enabled = mode == "on" or (mode == "auto" and total_docs > 0)
        self.every_sec = every_sec
        self.started = time.monotonic()
        self.last_line: float | None = None  # when the last plain line was written
        self.docs = self.docs_chunked = self.chunks_known = self.chunks_ready = 0
        self.lock = threading.Lock()
        self.bar = None
        if self.enabled and getattr(stream, "isatty", lambda: False)():
            from tqdm import tqdm  # comes with transformers; draws without escape sequences a legacy console shows
            self.bar = tqdm(total=None, unit=self.unit, file=stream, desc=self.label, dynamic_ncols=True,
                            mininterval=0.5)

    def chunked(self, chunks: int) -> None:
        """A document was cut into `chunks` chunks (the total's estimate follows)."""
        with self.lock:
            self.docs_chunked += 1
            self.chunks_known += chunks
            self._show()

    def ready(self, chunks: int) -> None:
        """`chunks` more chunks have their vectors (any thread)."""
        with self.lock:
            self.chunks_ready += chunks
            self._show()

    def advance(self, docs: int = 0) -> None:
        """`docs` more documents are complete in Chroma."""
        with self.lock:
            self.docs += docs
            self._show()

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self._update_bar()
                self.bar.close()
            elif self.enabled and self.last_line is not None:
                self.stream.write(self._line(time.monotonic()) + "\n")
                self.stream.flush()

    def counts(self) -> tuple[int, int | None, str]:
        """(done, total or its estimate, what else to say), in `unit`s."""
        total = None
        if self.docs_chunked:
            per_doc = self.chunks_known / self.docs_chunked
            total = self.chunks_known + round(max(self.total_docs - self.docs_chunked, 0) * per_doc)
        return self.chunks_ready, total, f"docs {self.docs}/{self.total_docs}"

    def _show(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self._update_bar()
            return
        now = time.monotonic()
        if self.last_line is None or now - self.last_line >= self.every_sec:
            self.last_line = now
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()

    def _update_bar(self) -> None:
        done, total, also = self.counts()
        if total is not None and total != self.bar.total:
            self.bar.total = max(total, done)
        self.bar.set_postfix_str(also, refresh=False)
        self.bar.update(done - self.bar.n)

    def _line(self, now: float) -> str:
        done, total, also = self.counts()
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        of = "" if total is None else f"/~{total}" if self.estimated else f"/{total}"
        eta = f"{max(total - done, 0) / rate:.0f}s" if total is not None and rate > 0 else "?"
        return (f"{self.label} {done}{of} {self.unit}s, {also}, {rate:.1f} {self.unit}s/s, "
                f"elapsed {elapsed:.0f}s, eta {eta}")
