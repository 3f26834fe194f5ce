"""Progress that moves while the model works: a line at once, then one per forward pass's worth of news
(issue 23, item 13). Off a terminal plain lines, on a terminal tqdm's bar, never an escape sequence."""
from __future__ import annotations

import io
import re

from conftest import HASH_BUILD, collection_rows, run_cli, write_corpus

from chroma_resume import embedders
from chroma_resume.config import make_config
from chroma_resume.reporting import Progress

LINE = re.compile(r"^\[PROGRESS\] (\d+)(?:/~(\d+))? chunks, docs (\d+)/(\d+), ")


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_each_forward_pass_of_the_model_reports_its_texts():
    """The real model, 10 texts at 4 per pass: three reports (4, 4, 2), not one per upsert batch."""
    model = embedders.load_torch(make_config(embed_batch=4))
    passes: list[int] = []
    vectors = model.encode([f"text number {i} " * (i + 1) for i in range(10)], passes.append)
    assert sorted(passes) == [2, 4, 4] and vectors.shape[0] == 10


def test_off_a_terminal_the_first_line_comes_at_once_and_the_total_is_estimated():
    log = io.StringIO()
    progress = Progress(total_docs=4, mode="on", stream=log, every_sec=3600)
    progress.chunked(3)  # the first document: 3 chunks, so ~12 for four
    first = log.getvalue().splitlines()
    assert len(first) == 1 and LINE.match(first[0]).groups() == ("0", "12", "0", "4")
    progress.ready(3)  # within every_sec: no second line yet
    assert len(log.getvalue().splitlines()) == 1
    progress.close()  # the last figures are always written
    last = LINE.match(log.getvalue().splitlines()[-1]).groups()
    assert last == ("3", "12", "0", "4") and "\r" not in log.getvalue()


def test_on_a_terminal_a_bar_moves_per_report_without_escape_sequences():
    screen = Terminal()
    progress = Progress(total_docs=2, mode="on", stream=screen)
    progress.chunked(5)
    progress.ready(4)
    progress.close()
    drawn = screen.getvalue()
    assert "\r" in drawn and "\x1b" not in drawn  # a legacy Windows console prints ESC[K as text
    assert "4/10" in drawn, drawn  # 5 chunks of one document of two: ~10


def test_a_builds_last_progress_line_counts_every_chunk_it_wrote(tmp_path):
    write_corpus(tmp_path / "corpus", 12, seed=5)
    done = run_cli(["build", *HASH_BUILD, "--progress", "on", "--embed-batch", "4"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [LINE.match(line) for line in done.stderr.splitlines() if line.startswith("[PROGRESS]")]
    assert len(lines) >= 2, done.stderr  # one at once, one at the end
    chunks = len(collection_rows(tmp_path / ".chroma", "test"))
    assert lines[-1].groups() == (str(chunks), str(chunks), "12", "12")
