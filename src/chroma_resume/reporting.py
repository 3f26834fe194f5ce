"""What a run tells its user: structured warnings and a progress display on stderr."""
from __future__ import annotations

import sys
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
    """A live bar on a terminal; plain periodic lines when stderr is a log file.

    Chunk totals are unknown until each document is chunked, so the ETA follows documents."""

    def __init__(self, total_docs: int, mode: str = "auto", stream: TextIO = sys.stderr, every_sec: float = 10.0):
        self.total_docs = total_docs
        self.stream = stream
        self.enabled = mode == "on" or (mode == "auto" and total_docs > 0)
        self.live = getattr(stream, "isatty", lambda: False)()
        self.every_sec = every_sec
        self.started = self.last = time.monotonic()
        self.docs = self.chunks = 0
        self.drawn = 0  # the longest live line so far: the next one pads over it

    def advance(self, docs: int = 0, chunks: int = 0) -> None:
        self.docs += docs
        self.chunks += chunks
        now = time.monotonic()
        if not self.enabled or (not self.live and now - self.last < self.every_sec):
            return
        self.last = now
        self._draw(now)

    def close(self) -> None:
        if self.enabled and self.docs:
            self._draw(time.monotonic())
            if self.live:
                self.stream.write("\n")
                self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        docs_rate = self.docs / elapsed
        eta = f"{(self.total_docs - self.docs) / docs_rate:.0f}s" if docs_rate > 0 else "?"
        width = 24
        filled = int(width * self.docs / self.total_docs) if self.total_docs else width
        line = (f"[PROGRESS] [{'#' * filled}{'.' * (width - filled)}] docs={self.docs}/{self.total_docs} "
                f"chunks={self.chunks} rate={self.chunks / elapsed:.1f}chunks/s eta={eta}")
        # padded over the previous line instead of ESC[K: a legacy Windows console prints escapes as text
        self.drawn = max(self.drawn, len(line))
        self.stream.write(("\r" + line.ljust(self.drawn)) if self.live else line + "\n")
        self.stream.flush()
