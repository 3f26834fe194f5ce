"""Deterministic character-budget chunking that prefers natural boundaries.

A chunk ends at the best boundary inside its window: a paragraph break, then a
line break, then a sentence end (Latin or CJK punctuation), then a space, and
only then a hard cut. The next chunk starts `overlap` characters earlier,
moved forward to a word start so no chunk begins mid-word.
"""
from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?;:。！？；…](?:[\"'”’)\]」』]*)(?=\s|$)|[。！？；…]")
_SPACE = re.compile(r"\s")


def chunk_text(text: str, chunk_chars: int, overlap_chars: int, min_chunk_chars: int) -> list[str]:
    text = text.strip()
    if not text:
        return []
    chunks: list[str] = []
    start = 0
    while start < len(text):
        if len(text) - start <= chunk_chars:
            end = len(text)
        else:
            end = _best_break(text, start + max(min_chunk_chars, 1), start + chunk_chars)
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        start = _next_start(text, end, overlap_chars, start)
    if len(chunks) > 1 and len(chunks[-1]) < min_chunk_chars:
        tail = chunks.pop()
        chunks[-1] = _merge(chunks[-1], tail)
    return chunks


def _best_break(text: str, lo: int, hi: int) -> int:
    """The end offset of the chunk: the last good boundary in text[lo:hi]."""
    window = text[lo:hi]
    for sep in ("\n\n", "\n"):
        at = window.rfind(sep)
        if at != -1:
            return lo + at + len(sep)
    ends = [m.end() for m in _SENTENCE_END.finditer(window)]
    if ends:
        return lo + ends[-1]
    spaces = [m.end() for m in _SPACE.finditer(window)]
    if spaces:
        return lo + spaces[-1]
    return hi


def _next_start(text: str, end: int, overlap: int, previous_start: int) -> int:
    start = max(end - overlap, previous_start + 1)
    if start < end and start > 0 and not text[start - 1].isspace():
        match = _SPACE.search(text, start, end)
        start = match.end() if match else start
    while start < len(text) and text[start].isspace():
        start += 1
    return start


def _merge(head: str, tail: str) -> str:
    """Append a too-short last chunk to its predecessor without repeating the overlap."""
    for size in range(min(len(head), len(tail)), 0, -1):
        if head.endswith(tail[:size]):
            return head + tail[size:]
    return head + "\n" + tail
