"""The Ray executor's overhead, and the one writer's ceiling: whole processes, one run.

Run from the repository root with the project's venv and the ray extra:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ray.py [--quick] [--json FILE.json]

1. Executor overhead: the same cold build (default model, CPU) with `--executor local` and with
   `--executor ray --ray-workers 1` on this machine, once against a Ray the build starts itself
   (`--ray-address local`: what a user tries first) and once against a running one (what a
   cluster is), as a ratio of wall times of fresh processes.
2. The writer's ceiling: with the model out of the picture (the hash stand-in, 384-d like the
   default model), how many chunks per second one writer sustains through scan + chunk + cache +
   WAL + Chroma upsert, embedded store and a `chroma run` server. "cold" pays the stand-in and
   writes the cache; "from cache" is a fresh collection filled from a warm cache (no vector is
   computed: what a cluster that computes faster than the writer writes would see). A cProfile
   of the from-cache build says where the time goes. No cluster can go faster than this.
Helpers come from bench_build.py (corpus, process runner); no timing assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_build import ENV, Runner, pin_source, write_corpus  # noqa: E402

CEILING_SIZES = ((1.0, 10000, 12000),)  # ≈ 10 chunks of 1,200 characters per document
DIM = 384
# Where the writer spends its time: (label, file suffix, function) summed as cumulative seconds.
PROFILE_PARTS = (
    ("scan: read + hash documents", "corpus.py", "scan"),
    ("chunk", "chunking.py", "chunk_text"),
    ("chunk metadata", "state.py", "chunk_metadata"),
    ("Chroma get (chunk-level resume lookup)", "store.py", "held"),
    ("Chroma upsert", "store.py", "upsert"),
    ("cache read", "cache.py", "get_many"),
    ("cache write", "cache.py", "put_many"),
    ("WAL append", "wal.py", "append"),
    ("WAL fsync (barrier + commit group)", "wal.py", "sync"),
    ("reconcile (id scan)", "build.py", "_reconcile"),
    ("make durable (fsync the store)", "store.py", "make_durable"),
)


def executor_overhead(runner: Runner, a: argparse.Namespace) -> dict:
    """Rounds of local / Ray started by the build / running Ray, alternating (the load of a shared
    machine drifts); the best of each kind is reported."""
    write_corpus(runner.root / "small", a.docs, seed=11)
    cpus = str(os.cpu_count())
    import ray  # a cluster kept by this process for the builds to join, as a real cluster would be
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    joined = {**ENV, **{k: v for k, v in os.environ.items() if k.startswith("RAY_")}}  # its auth mode
    kinds = {"local": ((), None),
             "ray-started": (("--executor", "ray", "--ray-address", "local", "--ray-cpus-per-worker", cpus), None),
             "ray-running": (("--executor", "ray", "--ray-address", ray.get_runtime_context().gcs_address,
                              "--ray-cpus-per-worker", cpus), joined)}
    runs: dict[str, dict] = {}
    try:
        for i in range(a.rounds):
            for kind, (options, env) in kinds.items():
                name = f"exec-{kind}-{i}"
                r = runner.build(name, name, *options, docs="small", env=env)
                if kind not in runs or r["wall_sec"] < runs[kind]["wall_sec"]:
                    runs[kind] = r
    finally:
        ray.shutdown()
    chunks = {name: r["summary"]["chunks_embedded"] for name, r in runs.items()}
    assert len(set(chunks.values())) == 1, f"the builds embedded different chunk counts: {chunks}"
    return runs


def ceiling(runner: Runner, a: argparse.Namespace) -> dict:
    write_corpus(runner.root / "big", a.ceiling_docs, seed=5, sizes=CEILING_SIZES)
    cache = str(runner.root / "ceiling-cache.sqlite3")
    common = ("--embed-model", f"hash:{DIM}", "--embed-cache", cache)
    runs = {"cold": runner.build("ceiling-cold", "ceiling-cold", *common, docs="big")}
    runs["from-cache"] = runner.build("ceiling-warm", "ceiling-warm", *common, docs="big")
    for batch in a.upsert_batches:
        runs[f"from-cache-batch-{batch}"] = runner.build(f"ceiling-warm-{batch}", f"ceiling-warm-{batch}", *common,
                                                         "--upsert-batch", str(batch), docs="big")
    runs["chromadb"] = _raw_upserts(runner, runs["cold"]["summary"]["chunks_upserted"], DIM)
    profile = runner.root / "ceiling.prof"
    runs["profiled"] = runner.build("ceiling-profiled", "ceiling-profiled", *common, docs="big",
                                    python=("-m", "cProfile", "-o", str(profile)))
    runs["profiled"]["parts"] = where_the_time_goes(profile)
    if shutil.which("chroma", path=os.path.dirname(sys.executable)) or shutil.which("chroma"):
        runs["server"] = _server_build(runner, common)
    for r in runs.values():
        r["chunks_per_sec"] = r["summary"]["chunks_upserted"] / r["wall_sec"]
    return runs


def _raw_upserts(runner: Runner, n: int, dim: int) -> dict:
    """The peer: a script that chunks the same corpus and calls `collection.upsert` with the same rows
    (ids, texts, metadata; random unit vectors), 256 per call, in a fresh process: no cache, no WAL."""
    r = runner.run("chromadb-upserts", [sys.executable, __file__, "worker", json.dumps(
        {"path": str(runner.root / "raw-db"), "corpus": str(runner.root / "big"), "dim": dim})], env=ENV)
    assert r["rc"] == 0, f"the raw upsert worker failed: {Path(r['stderr_file']).read_text()[-2000:]}"
    upserted = int(r["stdout"].split()[-1])
    assert upserted == n, f"the peer upserted {upserted} rows, the build {n}"
    r["summary"] = {"chunks_upserted": upserted}
    return r


def raw_upsert_worker(a: dict) -> None:
    import hashlib

    import chromadb
    import numpy as np

    from chroma_resume import state
    from chroma_resume.chunking import chunk_text

    rng = np.random.default_rng(0)
    collection = chromadb.PersistentClient(path=a["path"]).create_collection(
        "raw", metadata={"hnsw:space": "cosine"}, embedding_function=None)
    rows: list[tuple] = []
    upserted = 0

    def flush() -> None:
        vectors = rng.standard_normal((len(rows), a["dim"]), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids, texts, metadatas = zip(*rows)
        collection.upsert(ids=list(ids), embeddings=vectors, documents=list(texts), metadatas=list(metadatas))
        rows.clear()

    root = Path(a["corpus"])
    for path in sorted(root.rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        uri, sha = path.relative_to(root).as_posix(), hashlib.sha256(text.encode()).hexdigest()
        doc_id = hashlib.sha256(uri.encode()).hexdigest()[:16]
        chunks = chunk_text(text, 1200, 150, 200)
        for i, chunk in enumerate(chunks):
            rows.append((state.chunk_id(doc_id, sha, i), chunk,
                         state.chunk_metadata(uri, doc_id, sha, "md", {}, i, len(chunks), chunk)))
            if len(rows) == 256:
                upserted += len(rows)
                flush()
    if rows:
        upserted += len(rows)
        flush()
    print(upserted)


def _server_build(runner: Runner, common: tuple[str, ...]) -> dict:
    """A from-cache build into a `chroma run` server on this machine (started and stopped here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    chroma = shutil.which("chroma", path=os.path.dirname(sys.executable)) or shutil.which("chroma")
    log = (runner.root / "logs" / "chroma-server.log").open("w")
    server = subprocess.Popen([chroma, "run", "--path", str(runner.root / "server-data"), "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "chroma run did not start"
                time.sleep(0.2)
        return runner.build("ceiling-server", "ceiling-server", *common, "--chroma-host", "127.0.0.1",
                            "--chroma-port", str(port), docs="big")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def where_the_time_goes(profile: Path) -> dict[str, float]:
    """Cumulative seconds of the writer's stages (main thread), from a cProfile of a whole build."""
    stats = pstats.Stats(str(profile)).stats
    total = max(ct for (_, _, _), (_, _, _, ct, _) in stats.items())
    parts = {"whole build (profiled)": total}
    for label, suffix, func in PROFILE_PARTS:
        parts[label] = sum(ct for (file, _, name), (_, _, _, ct, _) in stats.items()
                           if name == func and file.endswith(suffix))
    return parts


def report(ex: dict | None, ce: dict | None) -> list[str]:
    lines = []
    if ex:
        base = ex["local"]["wall_sec"]
        lines.append(f"executor overhead ({ex['local']['summary']['chunks_embedded']} chunks, default model, CPU, "
                     f"best of the rounds, wall time of whole processes):")
        for name, r in ex.items():
            lines.append(f"  {name:<12} {r['wall_sec']:7.1f} s   ×{r['wall_sec'] / base:.2f} of local   "
                         f"peak RSS of the build {r['peak_rss_mb']:.0f} MB")
    if ce:
        lines.append(f"writer's ceiling ({ce['cold']['summary']['chunks_upserted']} chunks, hash:{DIM}, cache on):")
        for name, r in ce.items():
            if name != "profiled":
                lines.append(f"  {name:<22} {r['wall_sec']:7.1f} s   {r['chunks_per_sec']:7.0f} chunks/s")
        parts = ce["profiled"]["parts"]
        whole = parts["whole build (profiled)"]
        lines.append(f"  where the time goes (from-cache build under cProfile, {whole:.1f} s):")
        for label, sec in parts.items():
            lines.append(f"    {label:<42} {sec:7.1f} s  {100 * sec / whole:5.1f}%")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    ap.add_argument("--docs", type=int, help="documents of the executor-overhead corpus (default 24; quick 12)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the executor builds (default 2)")
    ap.add_argument("--ceiling-docs", type=int, help="documents of the ceiling corpus, ≈10 chunks each "
                                                     "(default 10000 ≈ 100k chunks; quick 1000)")
    ap.add_argument("--upsert-batches", type=int, nargs="*", default=[], help="also measure these --upsert-batch")
    ap.add_argument("--only", choices=("executor", "ceiling"), help="measure one part")
    ap.add_argument("--json", metavar="FILE", help="also write every process record as JSON")
    ap.add_argument("--commit", metavar="REV", help="measure this commit's src/ (default: the working tree)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args(argv)
    a.docs = a.docs or (12 if a.quick else 24)
    a.ceiling_docs = a.ceiling_docs or (1000 if a.quick else 10000)
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    started = time.perf_counter()
    try:
        commit = pin_source(root, a.commit)
        runner = Runner(root)
        ex = executor_overhead(runner, a) if a.only != "ceiling" else None
        ce = ceiling(runner, a) if a.only != "executor" else None
    finally:
        if a.keep:
            print(f"[bench] work folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %z')} · commit {commit} · {os.cpu_count()} cores · "
          f"total {time.perf_counter() - started:.0f} s")
    print("\n".join(report(ex, ce)))
    if a.json:
        Path(a.json).write_text(json.dumps({"executor": ex, "ceiling": ce}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(raw_upsert_worker(json.loads(sys.argv[2])))
    sys.exit(main())
