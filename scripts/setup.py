"""Create .venv and install chroma-resume with its test and ray extras, on Windows and POSIX alike.

    py -3.11 scripts\\setup.py        (Windows, CMD)
    python3 scripts/setup.py          (Linux, macOS, WSL)

Standard library only: it runs before anything is installed. torch comes first, pinned to the CPU
build (on Linux any looser spec pulls a multi-GB CUDA build; Windows' wheel is the CPU build). Pip's own
progress is shown: a first install downloads a few GB.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

TORCH = "torch==2.13.0"
EXTRAS = ".[test,ray]"  # one argv word: no shell ever sees the brackets
REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"


def venv_python(folder: Path = VENV, windows: bool = os.name == "nt") -> Path:
    """The environment's interpreter: Scripts\\python.exe on Windows, bin/python elsewhere."""
    return folder / ("Scripts/python.exe" if windows else "bin/python")


def steps(python: Path) -> list[list[str]]:
    """The pip commands, in order (a test checks them without running pip)."""
    pip = [str(python), "-m", "pip", "install"]
    return [[*pip, "--upgrade", "pip"], [*pip, TORCH], [*pip, "-e", EXTRAS]]


def main() -> int:
    if sys.version_info < (3, 11):
        print(f"chroma-resume needs Python 3.11 or newer; this is {sys.version.split()[0]} "
              f"(on Windows: py -3.11 scripts\\setup.py)", file=sys.stderr)
        return 2
    python = venv_python()
    if not python.exists():
        print(f"[setup] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    for command in steps(python):
        shown = subprocess.list2cmdline(command) if os.name == "nt" else shlex.join(command)
        print(f"[setup] {shown}", flush=True)
        done = subprocess.run(command, cwd=REPO)
        if done.returncode != 0:
            print(f"[setup] failed (exit {done.returncode}): {shown}", file=sys.stderr)
            return done.returncode
    runner = r".venv\Scripts\doit" if os.name == "nt" else ".venv/bin/doit"
    print(f"[setup] done: run {runner} to build the sample index", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
