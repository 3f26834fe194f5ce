"""What a Windows user meets at the console: code pages, the shell fixes are pasted into, doit's
spawn workers, Ctrl+Break. Simulated on Linux (see README, "Windows (CMD)")."""
from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chroma_resume import commands
from conftest import HASH_BUILD, write_corpus

pytestmark = pytest.mark.timeout(240)


# ---- code pages ----------------------------------------------------------------------------------

def _run(args: list[str], cwd: Path, encoding: str) -> tuple[int, str, str]:
    """The CLI with stdout/stderr redirected to pipes in `encoding`, as Python 3.11 on Windows writes a
    redirected stream in the ANSI code page."""
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    env.update(HF_HUB_OFFLINE="1", PYTHONIOENCODING=encoding)
    done = subprocess.run([sys.executable, "-m", "chroma_resume", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=200)
    return done.returncode, done.stdout.decode(encoding), done.stderr.decode(encoding)


@pytest.mark.parametrize("encoding", ["cp1252", "cp936"])
def test_a_folder_the_code_page_cannot_name_builds_and_verifies(tmp_path, encoding):
    root = tmp_path / "知识库 😀"
    write_corpus(root / "corpus", 5)
    code, out, err = _run(["build", *HASH_BUILD], root, encoding)
    assert code == 0 and "Traceback" not in err, err
    assert "[CONFIG]" in out and "\\U0001f600" in out  # the emoji escaped, the rest of the line intact
    code, out, err = _run(["verify", *HASH_BUILD], root, encoding)
    assert code == 0 and "verify: ok" in out, out + err
    (root / "corpus" / "doc0000.md").write_text("changed ✓ 改变\n", encoding="utf-8")
    code, out, err = _run(["verify", *HASH_BUILD, "--fresh", "--report", "reports/v.json"], root, encoding)
    assert code == 1 and "Traceback" not in err, err
    report = json.loads((root / "reports" / "v.json").read_bytes().decode("utf-8"))
    assert report["ok"] is False and report["fix"]


# ---- the shell a fix is pasted into ------------------------------------------------------------------

def test_fixes_are_quoted_for_cmd_on_windows_and_posix_shells_elsewhere():
    words = ["chroma-resume", "build", r"--root=C:\Users\Zoë\my docs", "--include=*.md", "--collection=it's"]
    cmd = commands.shell_join(words, windows=True)
    posix = commands.shell_join(words, windows=False)
    assert cmd == r'''chroma-resume build "--root=C:\Users\Zoë\my docs" --include=*.md --collection=it's'''
    assert "'" not in cmd.replace("it's", "")  # CMD passes single quotes through literally
    assert shlex.split(posix) == words


def test_printed_fixes_follow_the_platform(monkeypatch, tmp_path):
    from chroma_resume import osfs
    from chroma_resume.config import make_config

    c = make_config(root=str(tmp_path / "my docs"), collection="notes")
    monkeypatch.setattr(osfs, "IS_WINDOWS", True)
    assert commands.move_command("C:\\s\\index state.json", "x.corrupt") == 'move "C:\\s\\index state.json" x.corrupt'
    assert f'"--root={tmp_path / "my docs"}"' in commands.command_line(c, "build")
    monkeypatch.setattr(osfs, "IS_WINDOWS", False)
    assert commands.move_command("a b", "c") == "mv 'a b' c"
    assert f"'--root={tmp_path / 'my docs'}'" in commands.command_line(c, "build")


def test_cmd_quoting_round_trips_through_the_windows_argument_rules():
    """What CreateProcess' argument splitting (the rules list2cmdline writes for) gives back."""
    words = ["a b", 'say "hi"', "back\\slash\\", "", "plain"]
    line = commands.shell_join(words, windows=True)
    assert _split_windows(line) == words


@given(st.lists(st.text(alphabet=' \ta"\\&|<>^()%!.:', max_size=8), max_size=4))
def test_cmd_quoting_round_trips_and_keeps_cmd_metacharacters_inside_quotes(words):
    """Any words come back whole from the Windows argument rules, and CMD (which knows no backslash
    escape: each double quote toggles its quoting) sees none of its metacharacters outside quotes, so
    a pasted fix naming `C:\\R&D\\docs` is one command, not two."""
    line = commands.shell_join(words, windows=True)
    assert _split_windows(line) == words
    if not any('"' in word for word in words):  # Windows paths cannot hold a quote
        assert not _unquoted_for_cmd(line) & commands.CMD_METACHARACTERS, line


def _unquoted_for_cmd(line: str) -> set[str]:
    quoted, seen = False, set()
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif not quoted:
            seen.add(ch)
    return seen


def _split_windows(line: str) -> list[str]:
    """The MSVCRT rules: backslashes are literal unless they precede a quote; 2n backslashes + quote:
    n backslashes and a quote toggle; 2n+1: n backslashes and a literal quote."""
    words, word, quoted, i, any_word = [], "", False, 0, False
    while i < len(line):
        ch = line[i]
        if ch == "\\":
            n = len(line[i:]) - len(line[i:].lstrip("\\"))
            if i + n < len(line) and line[i + n] == '"':
                word += "\\" * (n // 2)
                if n % 2:
                    word += '"'
                    i += n + 1
                else:
                    i += n
                continue
            word += "\\" * n
            i += n
            continue
        if ch == '"':
            quoted, any_word = not quoted, True
        elif ch in " \t" and not quoted:
            if word or any_word:
                words.append(word)
            word, any_word = "", False
        else:
            word += ch
        i += 1
    if word or any_word:
        words.append(word)
    return words


# ---- doit -n under spawn ----------------------------------------------------------------------------

def test_every_task_action_and_uptodate_check_pickles(tmp_path, monkeypatch):
    """Windows' only start method is spawn: `doit -n 2` pickles each task for its workers."""
    from chroma_resume import doit_tasks

    (tmp_path / "pyproject.toml").write_text(
        "[tool.chroma-resume]\nembed-model = 'hash:32'\n"
        "[tool.chroma-resume.indexes.docs]\ndocs = 'd'\n[tool.chroma-resume.indexes.notes]\ndocs = 'n'\n")
    monkeypatch.chdir(tmp_path)
    tasks = []
    for command in ("build", "verify", "resume-status", "clean-wal", "repair", "cache-stats", "cache-prune"):
        found = doit_tasks._tasks(command, {}, run="r")
        tasks += [found] if isinstance(found, dict) else list(found)
    (tmp_path / "pyproject.toml").write_text("[tool.chroma-resume.indexes.bad]\nno-such-key = 1\n")
    refusing = doit_tasks._tasks("build", {})  # a broken table: its sub-task's refusal action
    tasks += [refusing] if isinstance(refusing, dict) else list(refusing)
    assert len(tasks) == 15
    for task in tasks:
        for part in (*task["actions"], *task.get("uptodate", [])):
            assert pickle.loads(pickle.dumps(part)) is not None, task["basename"]


# ---- Ctrl+Break ------------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX only: SIGUSR1 stands in for SIGBREAK")
def test_ctrl_break_stops_a_build_like_ctrl_c(monkeypatch):
    """Windows' SIGBREAK (Ctrl+Break, a closed console), stood in for by SIGUSR1: the same graceful stop."""
    build = importlib.import_module("chroma_resume.build")  # the module (chroma_resume.build is the API's function)

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    assert build.stop_signals() == [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]
    with build._StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGUSR1) == stop._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
