"""What the durability rules of DESIGN §13 cost, measured in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_durability.py [--chunks 100000] [--docs 1000]

1. The deep store check after an unclean end (`store.check_deep`) on a collection of --chunks
   rows, against what a user would run to read the same rows: chromadb's own
   `collection.get(include=["embeddings"])`, paged. Each side in a fresh process (chromadb
   loads the HNSW index on the first read), best of --rounds.
2. The embedding cache durable at the batch barrier (synchronous=FULL: one fsync of its -wal
   per batch): a cold build of --docs one-chunk documents with the stand-in embedder, cache at
   FULL (the rule) against NORMAL (before it), alternating, median of --rounds; and one batch's
   `put_many` alone (--upsert-batch vectors), FULL against NORMAL.

No timing assertions; the table is for the reader. The disk is what the work folder is on
(--work-dir): fsync costs nothing on tmpfs, so measure on a real disk.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLLECTION = "bench"
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud harbor".split()

_READ_ALL = """
import sys, time, chromadb
t = time.perf_counter()
col = chromadb.PersistentClient(path=sys.argv[1]).get_collection(sys.argv[2])
n, offset = 0, 0
while True:
    page = col.get(include=["embeddings"], limit=5000, offset=offset)
    if not len(page["ids"]):
        break
    n += len(page["ids"]); offset += len(page["ids"])
print(time.perf_counter() - t, n)
"""
_CHECK = """
import sys, time, chromadb
from chroma_resume import config, store
t = time.perf_counter()
c = config.make_config(root=sys.argv[1], db="db", collection=sys.argv[2])
what = sys.argv[3]
n = store.check_deep(c) if what == "deep" else (store.check_index(c) and store.open_store(c).count())
print(time.perf_counter() - t, n)
"""


def fill_store(root: Path, chunks: int, dim: int) -> float:
    """A collection of `chunks` random unit vectors with short documents, written through chromadb."""
    import chromadb
    import numpy as np

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    client = chromadb.PersistentClient(path=str(root / "db"))
    col = client.create_collection(COLLECTION, metadata={"hnsw:space": "cosine"}, embedding_function=None)
    step = min(5000, client.get_max_batch_size())
    for lo in range(0, chunks, step):
        n = min(step, chunks - lo)
        vectors = rng.standard_normal((n, dim)).astype("float32")
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        col.upsert(ids=[f"c{lo + i}" for i in range(n)], embeddings=vectors,
                   documents=[f"chunk {lo + i}" for i in range(n)], metadatas=[{"i": lo + i} for i in range(n)])
    return time.perf_counter() - started


def timed(script: str, *args: str) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                         env=env, timeout=3600).stdout.split()
    return float(out[0]), int(out[1])


def bench_deep(work: Path, chunks: int, dim: int, rounds: int) -> dict:
    fill = fill_store(work, chunks, dim)
    best = {name: min(timed(script, *args)[0] for _ in range(rounds)) for name, script, args in (
        ("chromadb_get_all_embeddings", _READ_ALL, (str(work / "db"), COLLECTION)),
        ("check_deep", _CHECK, (str(work), COLLECTION, "deep")),
        ("check_index_only", _CHECK, (str(work), COLLECTION, "index")))}
    return {"chunks": chunks, "dim": dim, "fill_s": round(fill, 2), **{k: round(v, 3) for k, v in best.items()},
            "ratio_deep_vs_get_all": round(best["check_deep"] / best["chromadb_get_all_embeddings"], 3)}


def write_docs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    for i in range(n):  # ~1,000 characters: one chunk each
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(150)]
        (folder / f"d{i:05d}.md").write_text(f"document {i} " + " ".join(words) + "\n", encoding="utf-8")


def one_build(work: Path, sync: str, batch: int, run: int) -> tuple[float, int]:
    """A cold build into its own folders (chromadb keeps a client per path in this process)."""
    from chroma_resume import cache, config
    from chroma_resume.build import build

    original = cache._connect

    def connect(path: str, busy_timeout: float):
        db = original(path, busy_timeout)
        db.execute(f"PRAGMA synchronous={sync}")
        return db

    cache._connect = connect
    try:
        c = config.make_config(root=str(work), docs="docs", db=f"db{run}", state_root=f"state{run}",
                               collection=COLLECTION, embed_model="hash:384", upsert_batch=batch, progress="off")
        started = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            s = build(c, out=quiet, err=quiet)
        return time.perf_counter() - started, s.chunks_embedded
    finally:
        cache._connect = original


def bench_cache(work: Path, docs: int, batch: int, rounds: int) -> dict:
    write_docs(work / "docs", docs)
    times: dict[str, list[float]] = {"FULL": [], "NORMAL": []}
    one_build(work, "FULL", batch, run=-1)  # warm-up: imports and chromadb's first client
    chunks = 0
    for r in range(rounds):
        for sync in ("NORMAL", "FULL"):
            seconds, chunks = one_build(work, sync, batch, run=2 * r + (sync == "FULL"))
            times[sync].append(seconds)
    full, normal = statistics.median(times["FULL"]), statistics.median(times["NORMAL"])
    groups = -(-chunks // batch)
    return {"docs": docs, "chunks": chunks, "groups": groups, "build_full_s": round(full, 3),
            "build_normal_s": round(normal, 3), "build_ratio_full_vs_normal": round(full / normal, 3),
            "per_group_ms_from_builds": round((full - normal) / groups * 1000, 2),
            **put_many_cost(work, batch, rounds=20)}


def put_many_cost(work: Path, batch: int, rounds: int) -> dict:
    """One batch's cache commit alone, FULL against NORMAL: the fsync the barrier now includes."""
    import numpy as np

    from chroma_resume import cache

    out = {}
    for sync in ("NORMAL", "FULL"):
        path = work / f"cache-{sync}.sqlite3"
        store = cache.EmbedCache(str(path), "bench", lambda *a, **k: None)
        store.db.execute(f"PRAGMA synchronous={sync}")
        vectors = np.random.default_rng(1).standard_normal((batch, 384)).astype("float32")
        spent = []
        for r in range(rounds):
            started = time.perf_counter()
            store.put_many([f"{sync} {r} {i}" for i in range(batch)], vectors)
            spent.append(time.perf_counter() - started)
        store.close()
        out[f"put_many_{sync.lower()}_ms"] = round(statistics.median(spent) * 1000, 2)
    out["put_many_extra_ms_per_group"] = round(out["put_many_full_ms"] - out["put_many_normal_ms"], 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=100_000, help="rows of the deep-check collection")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--docs", type=int, default=1000, help="one-chunk documents of the cache build")
    p.add_argument("--upsert-batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work-dir", help="where to build (default: a temporary folder, removed after)")
    p.add_argument("--skip-deep", action="store_true")
    a = p.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    work = Path(tempfile.mkdtemp(prefix="bench-durability-", dir=a.work_dir))
    try:
        result = {"cache": bench_cache(work / "cache", a.docs, a.upsert_batch, a.rounds)}
        if not a.skip_deep:
            result["deep_check"] = bench_deep(work / "deep", a.chunks, a.dim, a.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
