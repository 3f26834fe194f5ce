"""`python -m chroma_resume ARGS` in a fresh process, without paying for its imports each time.

Most tests run the real command line many times, and most of each run's time was imports: chromadb
(about 1 s) for every command, FlagEmbedding with torch and transformers (about 7 s) for every one that
embeds with the real model. Here a forkserver process (multiprocessing's, on POSIX) imports those
third-party libraries once; each command is a fork of it, so it is still its own process (its own pid,
locks, signal handlers, exit status, chromadb clients) and imports chroma_resume itself afresh, after
its environment and working folder are set, so every option and failpoint read at import is this
run's. What differs from an exec'd interpreter: the preloaded libraries read some variables once, at
import (huggingface_hub its HF_* settings, torch its thread counts), so a run whose environment differs
from the forkserver's in one of those runs as a plain subprocess instead; and warnings those imports
print go to the forkserver's stderr, not the run's.

Where there is no fork (Windows) every command runs as a plain subprocess.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing
from multiprocessing import forkserver
import os
import runpy
import subprocess
import sys
import tempfile

# Imported once by the forkserver; none of them is chroma_resume (it must read each run's environment).
PRELOAD = ["chromadb", "numpy", "msgspec", "FlagEmbedding"]
# What they read at import must be what every run is given (run_cli sets it too).
os.environ["HF_HUB_OFFLINE"] = "1"

# Variables the preloaded libraries read at import: a run that sets them otherwise is not forked.
READ_AT_IMPORT = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_",
                  "CUDA_", "PYTHON")

_context = None
_forkserver_env: dict[str, str] = {}


def _forkserver():
    global _context, _forkserver_env
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
        # Started now, with the environment compared against: a test that later sets a variable
        # the preloaded libraries read gets a plain subprocess, not a fork that read the old value.
        _forkserver_env = _read_at_import(os.environ)
        forkserver.ensure_running()
    return _context


def run(args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """What subprocess.run([python, -m, chroma_resume, *args], cwd=cwd, env=env, capture_output=True,
    text=True, timeout=timeout) returns: exit status, stdout, stderr."""
    return python(["-m", "chroma_resume", *args], cwd, env, timeout)


def python(argv: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` or `python -c CODE ARGS` (argv), as subprocess.run with capture_output
    and text would run it."""
    command = [sys.executable, *argv]
    if "forkserver" not in multiprocessing.get_all_start_methods() or not _forkable(env):
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="forkrun-") as folder:
        out_path, err_path = os.path.join(folder, "out"), os.path.join(folder, "err")
        child = _forkserver().Process(target=_command, args=(list(argv), str(cwd), dict(env), out_path, err_path))
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(command, timeout, _read(out_path), _read(err_path))
        return subprocess.CompletedProcess(command, child.exitcode, _read(out_path), _read(err_path))


def _read_at_import(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(READ_AT_IMPORT)}


def _forkable(env: dict) -> bool:
    _forkserver()
    return _read_at_import(env) == _forkserver_env


def _read(path: str) -> str:
    """"" where the fork died before it made the file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""


def _command(argv: list[str], cwd: str, env: dict, out_path: str, err_path: str) -> None:
    """In the fork: become `python -m MODULE ARGS` (or `-c CODE ARGS`) run in `cwd` with `env`, stdout and
    stderr into the files; leave with its exit status after the exit handlers an interpreter would run."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), encoding="utf-8", line_buffering=False)
    sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)
    flag, target, *args = argv
    sys.argv = [flag, *args]
    code = 0
    try:
        if flag == "-m":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else _say(done.code))
    except BaseException:  # what the interpreter does with an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _say(message) -> int:
    print(message, file=sys.stderr)
    return 1
