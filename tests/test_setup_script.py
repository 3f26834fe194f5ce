"""scripts/setup.py: the one set-up, for `py -3.11 scripts\\setup.py` (CMD) and `python3 scripts/setup.py`."""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

from conftest import REPO

SCRIPT = REPO / "scripts" / "setup.py"


def _load():
    spec = importlib.util.spec_from_file_location("setup_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_imports_only_the_standard_library():
    """It runs before anything is installed."""
    tree = ast.parse(SCRIPT.read_text(encoding="utf-8"))
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - {"__future__"} <= sys.stdlib_module_names, names - sys.stdlib_module_names


def test_torch_cpu_build_first_then_the_project_with_its_extras_progress_shown():
    setup = _load()
    steps = setup.steps(Path("py"))
    assert steps[1][-1] == "torch==2.13.0" and steps[2][-2:] == ["-e", ".[test,ray]"]
    assert all("-q" not in step and "--quiet" not in step for step in steps)  # pip's progress is shown
    torch_pin = next(d for d in _dependencies() if d.startswith("torch"))
    assert torch_pin.endswith("<=2.13.0")  # the pin setup installs satisfies the project's range


def test_the_venv_interpreter_is_found_where_each_os_puts_it():
    setup = _load()
    assert setup.venv_python(Path("v"), windows=True) == Path("v/Scripts/python.exe")
    assert setup.venv_python(Path("v"), windows=False) == Path("v/bin/python")
    assert setup.venv_python() == REPO / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def test_ci_runs_the_python_set_up():
    run = (REPO / ".ci" / "run").read_text()
    assert "python3 scripts/setup.py" in run and ".venv/bin/python -m pytest -q" in run


def _dependencies() -> list[str]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_every_posix_only_module_named_for_windows_exists():
    """The skip table in conftest.py names real modules (a renamed one would silently run on Windows)."""
    from conftest import POSIX_ONLY

    assert all((REPO / "tests" / name).is_file() for name in POSIX_ONLY), \
        [name for name in POSIX_ONLY if not (REPO / "tests" / name).is_file()]
