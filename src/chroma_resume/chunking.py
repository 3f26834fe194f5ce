"""Deterministic character-budget chunking that prefers natural boundaries.

A chunk ends at the best boundary inside its window: a paragraph break, then a
line break, then a sentence end (Latin or CJK punctuation), then a space, and
only then a hard cut. The next chunk starts `overlap` characters earlier,
moved forward to a word start so no chunk begins mid-word.

The chunker works on spans (offsets into the text) and derives the strings from
them, so that "no text is dropped" is a checkable property of the spans: starts
strictly increase, consecutive spans overlap by at most `overlap` characters and
are separated by whitespace only, and together they reach from the first to the
last non-whitespace character. A short last piece is merged into its
predecessor; the overlap to remove is known from the spans, never guessed from
the strings (guessing dropped text that repeats at the boundary).
"""
from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?;:。！？；…](?:[\"'”’)\]」』]*)(?=\s|$)|[。！？；…]")
_SPACE = re.compile(r"\s")

Span = tuple[int, int]


def chunk_text(text: str, chunk_chars: int, overlap_chars: int, min_chunk_chars: int) -> list[str]:
    """The chunks of `text`; see chunk_spans for what each one covers."""
    return [_render(text, parts) for parts in chunk_spans(text, chunk_chars, overlap_chars, min_chunk_chars)]


def chunk_spans(text: str, chunk_chars: int, overlap_chars: int, min_chunk_chars: int) -> list[tuple[Span, ...]]:
    """Each chunk as the spans of `text` it is made of: one span, or two when the
    last piece was shorter than `min_chunk_chars` and is merged into its predecessor.

    Every span starts and ends on non-whitespace. A one-span chunk is at most
    `chunk_chars` long; a merged one at most `chunk_chars + min_chunk_chars`.
    """
    lo = len(text) - len(text.lstrip())
    hi = len(text.rstrip())
    pieces: list[Span] = []
    start = lo
    while start < hi:
        if hi - start <= chunk_chars:
            end = hi
        else:
            end = _best_break(text, start + max(min_chunk_chars, 1), start + chunk_chars)
        pieces.append((start, _rstrip(text, start, end)))
        if end >= hi:
            break
        start = _next_start(text, end, overlap_chars, start, hi)
    chunks: list[tuple[Span, ...]] = [(p,) for p in pieces]
    if len(pieces) > 1 and pieces[-1][1] - pieces[-1][0] < min_chunk_chars:
        chunks[-2:] = [(pieces[-2], pieces[-1])]
    return chunks


def _render(text: str, parts: tuple[Span, ...]) -> str:
    """A merged tail continues its head after their true overlap, or after a newline
    when they do not overlap (as the chunker always did there: kept for stable output)."""
    (start, end), *tail = parts
    if not tail:
        return text[start:end]
    tail_start, tail_end = tail[0]
    if tail_start < end:
        return text[start:tail_end]
    return text[start:end] + "\n" + text[tail_start:tail_end]


def _rstrip(text: str, start: int, end: int) -> int:
    """`end` moved back over whitespace (`start` is not whitespace)."""
    while text[end - 1].isspace():
        end -= 1
    return end


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


def _next_start(text: str, end: int, overlap: int, previous_start: int, hi: int) -> int:
    """At most `overlap` before `end`, moved forward only to a word start before `end`
    or over whitespace, so nothing but whitespace lies between the chunks."""
    start = max(end - overlap, previous_start + 1)
    if start < end and not text[start - 1].isspace():
        match = _SPACE.search(text, start, end)
        start = match.end() if match else start
    while start < hi and text[start].isspace():
        start += 1
    return start
