"""Text output that never fails on the console's encoding.

Python 3.11 on Windows writes a redirected stdout (a log file, a pipe, CI) in the ANSI code page
(cp1252, cp936): a path with a character outside it (Chinese, an emoji) made the first line that
named it raise UnicodeEncodeError, so a command died at its [CONFIG] line. Here stdout and stderr
keep their encoding (what the reader of the log expects) and write what it cannot hold as a
backslash escape. Files we write (reports, state) are bytes in UTF-8 and never pass through here.
"""
from __future__ import annotations

import io
import sys


def make_output_safe() -> None:
    """Reconfigure sys.stdout and sys.stderr to escape what their encoding cannot hold (idempotent;
    streams that are not text files, e.g. a test's capture, are left as they are)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors != "backslashreplace":
            stream.reconfigure(errors="backslashreplace")
