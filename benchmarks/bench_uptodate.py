"""How much doit's up-to-date check costs now that it reads the collection's fingerprint (DESIGN §13).

Builds N small documents (default 10,000) with the hash stand-in, then times fresh processes, each
median of --rounds runs:
  chromadb     what a user could run instead to read the collection's metadata: PersistentClient(...)
               .get_collection(name).metadata (import included);
  catalogue    our read of the same fingerprint (store.stored_fingerprint: Chroma's sqlite catalogue);
  catalogue_ids  the collection's ids from the same catalogue (compared with the manifest's ids);
  up_to_date   the whole check (manifest, LATEST, WAL, fingerprint, a hash of every document);
  doit build   `doit build` saying "-- build" (doit's own start and task loading included).
Ratios are against the chromadb read. No model is loaded anywhere (asserted: torch never imported).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_uptodate.py [--docs 10000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = '[tool.chroma-resume]\ndocs = "corpus"\ncollection = "bench"\nembed-model = "hash:64"\nprogress = "off"\n'
CONFIG = "from chroma_resume import cli; c = cli.resolve_config({})\n"
PROBES = {
    "chromadb": "import chromadb; m = chromadb.PersistentClient(path='.chroma').get_collection('bench').metadata\n"
                "assert m['chroma_resume:incarnation']",
    "catalogue": CONFIG + "from chroma_resume import store; assert store.stored_fingerprint(c)['incarnation']",
    "catalogue_ids": CONFIG + "from chroma_resume import store; assert store.catalogue_ids(c)",
    "up_to_date": CONFIG + "import sys; from chroma_resume.status import up_to_date\nassert up_to_date(c)[0], "
                           "up_to_date(c)\nassert 'torch' not in sys.modules",
}


def timed(args: list[str], cwd: Path, rounds: int, expect: str = "") -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        assert done.returncode == 0 and expect in done.stdout, done.stdout + done.stderr
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-uptodate-") as folder:
        root = Path(folder)
        (root / "corpus").mkdir()
        for i in range(a.docs):
            (root / "corpus" / f"doc{i:05d}.md").write_text(f"document {i}: " + "lorem ipsum dolor " * (i % 40 + 5))
        (root / "pyproject.toml").write_text(PYPROJECT)
        (root / "dodo.py").write_text("from chroma_resume.doit_tasks import *  # noqa: F403\n"
                                      "DOIT_CONFIG = {'default_tasks': ['build']}\n")
        os.environ["HF_HUB_OFFLINE"] = "1"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "doit"], cwd=root, check=True, capture_output=True)
        print(f"built {a.docs} documents in {time.perf_counter() - start:.1f}s (hash:64)")
        rows = {name: timed([sys.executable, "-c", code], root, a.rounds) for name, code in PROBES.items()}
        rows["doit build"] = timed([sys.executable, "-m", "doit"], root, a.rounds, expect="-- build")
        base = rows["chromadb"]
        print(f"{'check':<12} {'seconds':>8} {'vs chromadb read':>17}")
        for name, seconds in rows.items():
            print(f"{name:<12} {seconds:>8.3f} {seconds / base:>16.2f}x")


if __name__ == "__main__":
    main()
