"""Shared helpers: run the real CLI in a process of its own (forked: tests/forkrun.py), make corpora,
read Chroma back."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forkrun

REPO = Path(__file__).resolve().parent.parent

# Test modules that need POSIX, with what they need: skipped on Windows with that reason; the rest runs
# there. (Failpoint kills end a process with SIGKILL here, exit status -9; on Windows TerminateProcess.)
POSIX_ONLY = {
    "test_bad_input.py": "SIGKILL exit statuses, a fifo, a lock holder's process group",
    "test_cache.py": "SIGKILL exit statuses",
    "test_durable.py": "SIGKILL exit statuses, /proc/self/fd",
    "test_doit.py": "fixes run by /bin/sh",
    "test_fault_matrix.py": "SIGKILL/SIGTERM kills of builds",
    "test_fixes_as_printed.py": "fixes run by /bin/sh",
    "test_gate.py": "a fork multiprocessing pool",
    "test_ray_executor.py": "SIGKILL exit statuses",
    "test_recovery_change.py": "SIGKILL exit statuses, fifos, a lock holder's process group",
    "test_resume.py": "SIGKILL exit statuses",
    "test_sequences.py": "SIGTERM of builds",
    "test_server.py": "SIGKILL of a chroma server's process group",
    "test_status_clean.py": "SIGKILL exit statuses, a lock holder's process group",
    "test_store_deep.py": "SIGKILL exit statuses",
    "test_store_repair.py": "/proc/self/fd",
    "test_trust_evidence.py": "SIGKILL/SIGTERM of builds, a lock holder's process group",
    "test_trust_regressions.py": "SIGKILL exit statuses",
    "test_verify.py": "SIGKILL exit statuses, fixes run by /bin/sh",
    "test_verify_gate.py": "fixes run by /bin/sh",
    "test_windows_semantics.py": "simulates Windows on Linux (/proc, fcntl)",
}


def pytest_collection_modifyitems(config, items):
    if sys.platform != "win32":
        return
    for item in items:
        if item.path.name in POSIX_ONLY:
            item.add_marker(pytest.mark.skip(reason=f"POSIX only: {POSIX_ONLY[item.path.name]}"))
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone "
         "cloud harbor lantern meadow orbit signal vector index chunk").split()


def write_corpus(folder: Path, n: int, seed: int = 0, sizes=(40, 250, 700)) -> dict[str, str]:
    """n markdown documents of mixed sizes (some span several chunks); returns uri -> text."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}
    for i in range(n):
        words = [rng.choice(WORDS) + ("." if rng.random() < 0.12 else "") for _ in range(rng.choice(sizes))]
        uri = f"doc{i:04d}.md"
        texts[uri] = " ".join(words) + "\n"
        (folder / uri).write_text(texts[uri], encoding="utf-8")
    return texts


def files(root: Path) -> dict[str, str]:
    """Every file under root by content: what a run created or changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """The real command line, as a user runs it, in a process of its own; failpoints travel in env."""
    full_env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    full_env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return forkrun.run(args, cwd, full_env, timeout)


def run_shell(line: str, cwd: Path, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """A command line exactly as printed, run by a shell, with `chroma-resume` on PATH as an installed
    console script would be (this interpreter, this checkout)."""
    shim = cwd / ".shim"
    shim.mkdir(exist_ok=True)
    script = shim / "chroma-resume"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -m chroma_resume "$@"\n')
    script.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    full_env.update({"HF_HUB_OFFLINE": "1", **(env or {}), "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}"})
    return subprocess.run(["/bin/sh", "-c", line], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


_READ_ROWS = """
import json, sys, chromadb
got = chromadb.PersistentClient(path=sys.argv[1]).get_collection(sys.argv[2]).get(
    include=["documents", "metadatas", "embeddings"])
digits = int(sys.argv[3]) if len(sys.argv) > 3 else None
rows = {i: [d, m, [round(float(x), digits) if digits is not None else float(x) for x in e]]
        for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"])}
print(json.dumps(rows))
"""


def collection_rows(db: Path, name: str, digits: int | None = 6) -> dict[str, tuple]:
    """id -> (document, metadata, embedding tuple rounded to `digits`, None: as stored), read in a fresh
    process: a chromadb client kept in this process can serve stale segments after another process wrote the DB."""
    rounding = [] if digits is None else [str(digits)]
    done = forkrun.python(["-c", _READ_ROWS, str(db), name, *rounding], os.getcwd(), dict(os.environ),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    return {i: (d, m, tuple(e)) for i, (d, m, e) in json.loads(out).items()}


@contextlib.contextmanager
def lock_holder(root: Path, lock: Path, build_args: list[str]):
    """A build paused right after taking the writer lock (failpoint sleep), yielded once the lock
    names its pid; SIGKILLed (with its process group) on exit, so the OS releases the lock."""
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    env.update(HF_HUB_OFFLINE="1", CHROMA_RESUME_FAILPOINTS="lock.acquired=sleep(8000)")
    holder = subprocess.Popen([sys.executable, "-m", "chroma_resume", "build", *build_args], cwd=root, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while _lock_pid(lock) != holder.pid:
            assert holder.poll() is None and time.monotonic() < deadline, "the build never took the lock"
            time.sleep(0.05)
        yield holder
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)


def _lock_pid(lock: Path) -> int | None:
    """The pid in the lock's holder sidecar (written once the lock is held)."""
    try:
        return json.loads(Path(f"{lock}.holder").read_text() or "{}").get("pid")
    except (OSError, ValueError):
        return None


def summary(stdout: str) -> dict[str, str]:
    """The key=value lines a build prints."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line and not line.startswith("["))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder with a 12-document corpus in ./corpus."""
    write_corpus(tmp_path / "corpus", 12)
    return tmp_path


# Options for fast builds with the deterministic stand-in embedder.
HASH_BUILD = ["--docs", "corpus", "--collection", "test", "--embed-model", "hash:32", "--upsert-batch", "16",
              "--progress", "off"]

# Two index tables over the hash stand-in, one .chroma: the doit group and --index cases.
TWO_INDEXES = """\
[tool.chroma-resume]
embed-model = "hash:32"
progress = "off"
[tool.chroma-resume.indexes.docs]
docs = "docs"
[tool.chroma-resume.indexes.notes]
docs = "notes"
"""


@pytest.fixture
def observed_wal(tmp_path: Path, monkeypatch):
    """(path, writer, sync log): a WAL begun with RUN_START whose fsyncs fault_injection records, as a
    power cut would see them (the harness's fsync patch is undone after the test)."""
    from chroma_resume import wal
    from fault_injection import engine

    for name in ("fsync", "fdatasync"):
        monkeypatch.setattr(os, name, getattr(os, name))
    sync_log = tmp_path / "sync.log"
    engine.observe_fsyncs(str(sync_log))
    path = str(tmp_path / "index_state.stage.jsonl")
    writer = wal.Writer(path, "run1", policy="off", interval=50)
    writer.append(wal.RunStart(wal_version=wal.WAL_VERSION, schema_hash="s", collection="c", db="d",
                               sync_mode="incremental", config={}, pid=1, host="h"))
    return path, writer, sync_log
