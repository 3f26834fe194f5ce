"""Chunking: budget respected, natural boundaries preferred, deterministic, CJK aware."""
from __future__ import annotations

import pytest

from chroma_resume.chunking import chunk_text

pytestmark = pytest.mark.timeout(30)


def test_empty_and_whitespace_give_no_chunks():
    assert chunk_text("", 500, 50, 100) == [] and chunk_text(" \n\t\n ", 500, 50, 100) == []


def test_short_text_is_one_chunk():
    assert chunk_text("  one small note.  ", 500, 50, 100) == ["one small note."]


def test_prefers_paragraph_breaks_and_respects_budget():
    paragraphs = [f"Paragraph {i} " + "word " * 60 for i in range(8)]
    chunks = chunk_text("\n\n".join(paragraphs), 700, 80, 100)
    assert len(chunks) > 1 and all(len(c) <= 700 for c in chunks)
    assert all(c.rstrip().endswith("word") for c in chunks[:-1])  # each ends where a paragraph ends


def test_cjk_sentences_split_at_cjk_punctuation():
    text = "".join(f"这是第{i}个句子，讲述索引与恢复。" for i in range(120))
    chunks = chunk_text(text, 300, 40, 50)
    assert len(chunks) > 3 and all(len(c) <= 300 for c in chunks)
    assert all(c.endswith("。") for c in chunks)


def test_overlap_repeats_the_end_of_the_previous_chunk():
    text = " ".join(f"w{i}." for i in range(400))
    chunks = chunk_text(text, 300, 60, 50)
    for prev, nxt in zip(chunks, chunks[1:]):
        assert nxt.split()[0] in prev.split()


def test_short_last_piece_is_merged_into_its_predecessor():
    text = "A" * 10 + " " + "b. " * 200 + "tail"
    chunks = chunk_text(text, 250, 20, 100)
    assert len(chunks[-1]) >= 100 and chunks[-1].endswith("tail")


def test_deterministic():
    text = "Mixed text. 中文句子。 More words here!\n\n" * 80
    assert chunk_text(text, 400, 50, 80) == chunk_text(text, 400, 50, 80)


def test_no_boundary_means_a_hard_cut_at_the_budget():
    chunks = chunk_text("x" * 1000, 300, 0, 10)
    assert [len(c) for c in chunks] == [300, 300, 300, 100]
