"""osfs owns every OS-dependent file operation; the package imports and type-checks as on Windows.

No Windows machine runs here: these checks stand in for one (an AST scan, an import with `fcntl`
unavailable, mypy's win32 platform), with tests/test_windows_semantics.py for the behaviour.
"""
from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chroma_resume import osfs

from conftest import REPO

PACKAGE = REPO / "src" / "chroma_resume"

# os functions whose behaviour differs on Windows (or that it lacks), and modules it lacks or that lock
_RAW_OS = {"open", "fsync", "fdatasync", "replace", "rename", "unlink", "remove", "pwrite", "pread",
           "sched_getaffinity"}
_RAW_MODULES = {"fcntl", "msvcrt", "filelock", "portalocker"}


def _raw_calls(path: Path) -> list[str]:
    """`file:line: what` for each forbidden import or attribute in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        what = None
        if isinstance(node, ast.Import):
            what = ", ".join(a.name for a in node.names if a.name.split(".")[0] in _RAW_MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("os", *_RAW_MODULES):
            if node.module != "os" or {a.name for a in node.names} & _RAW_OS:
                what = f"from {node.module} import ..."
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in {("os", n) for n in _RAW_OS} | {("signal", "SIGKILL")}:
                what = f"{node.value.id}.{node.attr}"
        if what:
            found.append(f"{path.name}:{node.lineno}: {what}")
    return found


def test_no_module_but_osfs_calls_os_dependent_file_operations():
    modules = [p for p in sorted(PACKAGE.glob("**/*.py")) if p.name != "osfs.py"] + [REPO / "dodo.py"]
    raw = [hit for p in modules for hit in _raw_calls(p)]
    assert not raw, "route these through chroma_resume.osfs:\n" + "\n".join(raw)


def test_the_scan_sees_what_it_forbids(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import fcntl, os, signal\nfrom os import replace\nos.fsync(3)\nsignal.SIGKILL\n")
    assert len(_raw_calls(sample)) == 4


_BLOCK_FCNTL = """
import importlib, importlib.util, pkgutil, sys, warnings
class NoFcntl:
    def find_spec(self, name, path=None, target=None):
        if name == "fcntl":
            raise ModuleNotFoundError("No module named 'fcntl'", name=name)
sys.meta_path.insert(0, NoFcntl())
sys.modules.pop("fcntl", None)
warnings.simplefilter("ignore")  # filelock notes that only its soft lock is left
import chroma_resume
failed = []
for m in pkgutil.walk_packages(chroma_resume.__path__, "chroma_resume."):
    if m.name != "chroma_resume.__main__":  # runs the CLI
        try:
            importlib.import_module(m.name)
        except Exception as exc:
            failed.append(f"{m.name}: {exc!r}")
spec = importlib.util.spec_from_file_location("dodo", sys.argv[1])
try:
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
except Exception as exc:
    failed.append(f"dodo.py: {exc!r}")
print("\\n".join(failed) or "all imported")
"""


def test_every_module_and_dodo_import_without_fcntl():
    """Windows has no fcntl: importing it at module level stops every command there, `doit list` too."""
    out = subprocess.run([sys.executable, "-c", _BLOCK_FCNTL, str(REPO / "dodo.py")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "all imported", out.stdout + out.stderr


def _mypy(platform: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "mypy", "--platform", platform, "--follow-imports=skip",
                          "--ignore-missing-imports", "--no-incremental", "--no-error-summary", "--hide-error-context",
                          "src/chroma_resume", "dodo.py"], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert "error:" in out.stdout or out.returncode == 0, out.stdout + out.stderr  # mypy itself ran
    return {line for line in out.stdout.splitlines() if ": error:" in line}


def test_mypy_for_win32_finds_nothing_that_linux_does_not():
    """The package's own typing debts are not this test's business; an attribute Windows lacks is."""
    pytest.importorskip("mypy")
    only_windows = _mypy("win32") - _mypy("linux")
    assert not only_windows, "\n".join(sorted(only_windows))


# ---- behaviour ----------------------------------------------------------------------------------

def _sharing_violation() -> PermissionError:
    exc = PermissionError(errno.EACCES, "The process cannot access the file because it is being used by another process")
    exc.winerror = 32  # what Windows sets; POSIX has no such attribute
    return exc


def test_replace_retries_a_sharing_violation_then_succeeds(tmp_path, monkeypatch):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"new")
    real, tries = os.replace, []

    def busy_twice(a, b):
        tries.append(a)
        if len(tries) <= 2:
            raise _sharing_violation()
        real(a, b)

    monkeypatch.setattr(os, "replace", busy_twice)
    osfs.replace(str(src), str(dst))
    assert len(tries) == 3 and dst.read_bytes() == b"new" and not src.exists()


def test_unlink_gives_up_on_a_lasting_sharing_violation_and_never_retries_posix_permission(tmp_path, monkeypatch):
    target = tmp_path / "held"
    target.write_bytes(b"x")
    tries = []

    def always(exc):
        def fail(path):
            tries.append(path)
            raise exc
        return fail

    monkeypatch.setattr(os, "unlink", always(_sharing_violation()))
    with pytest.raises(PermissionError):
        osfs.unlink(str(target))
    assert len(tries) == len(osfs._SHARING_WAITS) + 1
    tries.clear()
    monkeypatch.setattr(os, "unlink", always(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(PermissionError):
        osfs.unlink(str(target))
    assert len(tries) == 1  # a real permission error: no wait


def test_files_are_opened_binary_where_the_os_has_a_text_mode(tmp_path, monkeypatch):
    seen = []
    real = os.open
    monkeypatch.setattr(osfs, "O_BINARY", 0x8000)  # Windows' value
    monkeypatch.setattr(os, "open", lambda path, flags, mode=0o777: seen.append(flags) or real(path, flags & ~0x8000, mode))
    osfs.atomic_write(str(tmp_path / "m.json"), b"{}\n")
    osfs.append_bytes(str(tmp_path / "log"), b"line\n")
    writes = [flags for flags in seen if flags & (os.O_WRONLY | os.O_RDWR)]  # (the folder's fsync opens it read-only)
    assert len(writes) == 2 and all(flags & 0x8000 for flags in writes)
    assert (tmp_path / "m.json").read_bytes() == b"{}\n"


def test_folder_fsync_is_skipped_on_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(osfs, "IS_WINDOWS", True)
    synced = []
    monkeypatch.setattr(os, "open", lambda *a, **k: pytest.fail("Windows cannot open a folder"))
    monkeypatch.setattr(os, "fsync", synced.append)
    osfs.fsync_dir(str(tmp_path))
    assert synced == []  # nothing to fsync: NTFS journals the folder's metadata itself


def test_a_held_lock_names_its_holder_after_the_grace_wait(tmp_path):
    lock = str(tmp_path / "writer.lock")
    holder = {"pid": 4242, "host": "h", "run_id": "r1", "started_at": "t"}
    code = ("import sys, time; from chroma_resume import osfs\n"
            "with osfs.exclusive_lock(sys.argv[1], holder={'pid': 4242, 'host': 'h', 'run_id': 'r1', 'started_at': 't'}):\n"
            "    print('held', flush=True); sys.stdin.read()\n")
    other = subprocess.Popen([sys.executable, "-c", code, lock], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(osfs.LockBusy) as busy:
            with osfs.exclusive_lock(lock, wait=0.2, holder={"pid": os.getpid()}):
                pass
        assert busy.value.holder == "pid=4242 host=h run_id=r1 started_at=t"
        assert json.loads(Path(osfs.holder_path(lock)).read_text()) == holder  # the loser wrote nothing
    finally:
        other.stdin.close()
        other.wait(timeout=30)
    with osfs.exclusive_lock(lock, wait=0.2, holder={"pid": os.getpid()}):  # released when its holder ended
        assert json.loads(Path(osfs.holder_path(lock)).read_text()) == {"pid": os.getpid()}


def test_usable_cpus_without_affinity(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert osfs.usable_cpus() == (os.cpu_count() or 1)


def test_a_lock_path_over_windows_limit_is_named_as_such(tmp_path, monkeypatch):
    """Windows reports a too-long path as 'not found': the message must name the length, not locking."""
    from chroma_resume import state
    from chroma_resume.errors import UsageError

    def not_found(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "The system cannot find the path specified")

    monkeypatch.setattr(osfs, "IS_WINDOWS", True)
    monkeypatch.setattr(osfs, "exclusive_lock", not_found)
    deep = tmp_path / ("x" * 120) / ("y" * 120)
    with pytest.raises(UsageError, match=r"characters, over Windows' limit of 259.*LongPathsEnabled"):
        with state.WriterLock(str(deep), run_id="r"):
            pass
