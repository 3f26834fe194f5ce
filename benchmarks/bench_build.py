"""Benchmark chroma-resume: build overhead, no-op runs, memory, upsert splitting.

Run from the repository root with the project's venv:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_build.py [--quick] [--report FILE.json]

Everything is measured in one run and printed as ratios next to the raw seconds,
so the ratios compare numbers taken on the same machine minutes apart. There are
no timing assertions: the targets are printed for the reader to judge.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from chroma_resume import build as build_mod
from chroma_resume import config as cfg
from chroma_resume import corpus, embedding, state, store
from chroma_resume.chunking import chunk_text
from chroma_resume.config import make_config

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud harbor "
         "lantern meadow orbit signal vector index chunk model query shard batch commit resume write "
         "ahead log manifest schema token window overlap boundary").split()
SIZES = ((0.45, 300, 1100), (0.4, 1500, 3500), (0.15, 4000, 7000))  # (share, min chars, max chars)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


# ---- corpora -------------------------------------------------------------------------


@contextlib.contextmanager
def spying(owner, name: str, wrap):
    """Replace owner.name by wrap(original) for the block: the build's own calls get measured."""
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    try:
        yield
    finally:
        setattr(owner, name, original)

def _paragraphs(rng: random.Random, chars: int, para_chars: tuple[int, int] = (200, 700)) -> str:
    """Sentences in paragraphs, so the chunker finds natural boundaries as in real text."""
    paras, total = [], 0
    while total < chars:
        words, size = [], rng.randint(*para_chars)
        while sum(len(w) + 1 for w in words) < size:
            words.append(rng.choice(WORDS) + ("." if rng.random() < 0.1 else ""))
        paras.append(" ".join(words).capitalize() + ".")
        total += len(paras[-1]) + 2
    return "\n\n".join(paras) + "\n"


def write_corpus(folder: Path, n: int, sizes=SIZES, seed: int = 7, para_chars=(200, 700)) -> Path:
    """n markdown files with sizes drawn from `sizes` (a fixed seed: same corpus every run)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pick, acc = rng.random(), 0.0
        for share, lo, hi in sizes:
            acc += share
            if pick <= acc:
                break
        (folder / f"d{i // 100:03d}" / f"doc{i:05d}.md").parent.mkdir(exist_ok=True)
        (folder / f"d{i // 100:03d}" / f"doc{i:05d}.md").write_text(
            _paragraphs(rng, rng.randint(lo, hi), para_chars), encoding="utf-8")
    return folder


def config_for(root: Path, name: str, **options):
    """A config whose corpus, db and state all live under root/name (nothing shared)."""
    options = {"docs": "corpus", **options}
    return make_config(root=str(root / name), db="db", state_root="state", collection="bench",
                       progress="off", **options)


def quiet_build(c):
    return build_mod.build(c, out=io.StringIO(), err=io.StringIO())


def _ignore(*_args, **_kw) -> None:
    return None


# ---- 1. build overhead -------------------------------------------------------------

class _Clock:
    """Wall (perf_counter) and CPU (process_time: all threads of this process) seconds."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def time(self, call, *args):
        t, cpu = time.perf_counter(), time.process_time()
        try:
            return call(*args)
        finally:
            self.wall += time.perf_counter() - t
            self.cpu += time.process_time() - cpu


def bench_overhead(root: Path, docs: int, embed_batch: int, upsert_batch: int, rounds: int) -> dict:
    """The same model, chunks, batch sizes and commit groups with and without the build around them.

    Model load is excluded on both sides: standalone, the model is loaded (and warmed up) before
    the timer; in the build, embedding.load is wrapped so its duration in that run is subtracted.
    Embed-only passes and cold builds (each into a fresh db and state folder) alternate `rounds`
    times, with one more embed-only pass at the end; the fastest of each is compared, being the
    least disturbed by other load on the machine. Two contention-proof checks come with it: CPU
    time, and the build's time over the time its own embedder spent in encode (same pass).
    """
    corpus_dir = write_corpus(root / "overhead-corpus", docs)
    c = make_config(root=str(root), docs=str(corpus_dir), embed_batch=embed_batch, upsert_batch=upsert_batch)
    chunks = [t for d in corpus.scan(c, _ignore)
              for t in chunk_text(d.text, c.chunk_chars, c.overlap_chars, c.min_chunk_chars)]
    groups = [chunks[i:i + c.upsert_batch] for i in range(0, len(chunks), c.upsert_batch)]

    t0 = time.perf_counter()
    model = embedding.load(c)
    load_standalone = time.perf_counter() - t0
    model.encode(groups[0][:c.embed_batch])  # warm-up: torch's first passes are slower in any process

    def embed_only() -> _Clock:
        clock = _Clock()
        for group in groups:
            clock.time(model.encode, group)
        return clock

    def build_once(i: int) -> dict:
        load, encode, total = _Clock(), _Clock(), _Clock()

        def timed_load(real_load):
            def wrapped(cfg):
                embedder = load.time(real_load, cfg)
                real_encode = embedder.encode
                embedder.encode = lambda texts: encode.time(real_encode, texts)
                return embedder
            return wrapped

        with spying(embedding, "load", timed_load):
            summary = total.time(quiet_build, config_for(root, f"overhead-{i}", docs=str(corpus_dir),
                                                         embed_batch=embed_batch, upsert_batch=upsert_batch))
        assert summary.chunks_embedded == len(chunks), (summary.chunks_embedded, len(chunks))
        return {"wall": total.wall - load.wall, "cpu": total.cpu - load.cpu, "load": load.wall,
                "encode_wall": encode.wall}

    embeds, builds = [], []
    for i in range(rounds):
        embeds.append(embed_only())
        builds.append(build_once(i))
    embeds.append(embed_only())
    best = min(builds, key=lambda b: b["wall"])
    embed_wall, embed_cpu = min(e.wall for e in embeds), min(e.cpu for e in embeds)
    build_cpu = min(b["cpu"] for b in builds)
    return {"docs": docs, "chunks": len(chunks), "groups": len(groups), "embed_batch": c.embed_batch,
            "upsert_batch": c.upsert_batch, "rounds": rounds,
            "embed_only_passes_sec": [e.wall for e in embeds],
            "build_minus_load_passes_sec": [b["wall"] for b in builds],
            "embed_only_sec": embed_wall, "build_minus_load_sec": best["wall"],
            "build_model_load_sec": best["load"], "standalone_model_load_sec": load_standalone,
            "ratio_build_vs_embed": best["wall"] / embed_wall,
            "embed_only_cpu_sec": embed_cpu, "build_minus_load_cpu_sec": build_cpu,
            "ratio_build_vs_embed_cpu": build_cpu / embed_cpu,
            "build_encode_sec": best["encode_wall"], "ratio_build_vs_own_encode": best["wall"] / best["encode_wall"]}


# ---- 2. no-op run --------------------------------------------------------------------

NOOP_PROBE = """
import json, sys
from chroma_resume.cli import main
rc = main(sys.argv[1:])
print("@@" + json.dumps({"rc": rc, "torch": "torch" in sys.modules, "FlagEmbedding": "FlagEmbedding" in sys.modules}))
"""


def _cli_args(c) -> list[str]:
    return ["build", "--root", c.root, "--docs", c.docs, "--db", c.db, "--state-root", c.state_root,
            "--collection", c.collection, "--embed-model", c.embed_model, "--progress", "off"]


def bench_noop(root: Path, docs: int) -> dict:
    """A rerun over an unchanged corpus must hash files and stop: no model, no embedding.

    Timed end to end as a user sees it (`python -m chroma_resume build`, interpreter start
    included) and in-process; a probe subprocess reports whether torch/FlagEmbedding got imported.
    """
    c = config_for(root, "noop", embed_model="hash:64")
    write_corpus(Path(c.root) / "corpus", docs, sizes=((1.0, 200, 900),))
    t0 = time.perf_counter()
    first = quiet_build(c)
    first_sec = time.perf_counter() - t0

    # cwd = the bench folder, so the repository's [tool.chroma-resume] table is not picked up
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "chroma_resume", *_cli_args(c)], cwd=c.root, env=ENV,
                          capture_output=True, text=True)
    cli_sec = time.perf_counter() - t0
    assert proc.returncode == 0 and "[BUILD] up to date" in proc.stdout, proc.stdout + proc.stderr

    t0 = time.perf_counter()
    interp = subprocess.run([sys.executable, "-c", "pass"], env=ENV)
    interp_sec = time.perf_counter() - t0
    assert interp.returncode == 0

    probe = subprocess.run([sys.executable, "-c", NOOP_PROBE, *_cli_args(c)], cwd=c.root, env=ENV,
                           capture_output=True, text=True)
    seen = json.loads(probe.stdout.rsplit("@@", 1)[1])
    assert seen["rc"] == 0, probe.stderr

    loads = []
    with spying(embedding, "load", lambda real: lambda cfg: loads.append(cfg) or real(cfg)):
        t0 = time.perf_counter()
        again = quiet_build(c)
        inproc_sec = time.perf_counter() - t0
    assert not loads and again.chunks_embedded == 0, (len(loads), again.chunks_embedded)
    return {"docs": docs, "first_build_sec": first_sec, "chunks": first.expected_chunks,
            "cli_noop_sec": cli_sec, "python_startup_sec": interp_sec, "inprocess_noop_sec": inproc_sec,
            "inprocess_embedder_loads": len(loads), "inprocess_chunks_embedded": again.chunks_embedded,
            "cli_torch_imported": seen["torch"], "cli_flagembedding_imported": seen["FlagEmbedding"]}


# ---- 3. memory -----------------------------------------------------------------------

MEMORY_PROBE = """
import io, json, resource, sys, tracemalloc
from chroma_resume.build import build
from chroma_resume.config import make_config
c, trace = make_config(**json.loads(sys.argv[1])), sys.argv[2] == "trace"
if trace:  # count the build's Python objects, not the modules it imports
    import chromadb, chromadb.api.rust
    tracemalloc.start()
s = build(c, out=io.StringIO(), err=io.StringIO())
try:  # this process's own peak; ru_maxrss can carry the parent's peak across fork+exec
    hwm_kb = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
except (OSError, IndexError):
    hwm_kb = None
print("@@" + json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "hwm_kb": hwm_kb,
                         "py_peak": tracemalloc.get_traced_memory()[1] if trace else None,
                         "chunks": s.chunks_upserted}))
"""


def _probe(c, mode: str) -> dict:
    options = {k: getattr(c, k) for k in ("root", "docs", "db", "state_root", "collection", "embed_model", "progress")}
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps(options), mode], env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.rsplit("@@", 1)[1])


def bench_memory(root: Path, small: int, large: int) -> dict:
    """Peak memory of a fresh process building `small`, then `large` documents (same size mix).

    The build streams documents and holds one upsert group of chunks, so its own memory should
    grow with the manifest (per-document state), not with the corpus text. Two children per size:
    one for peak RSS (the whole process, Chroma's native side included), one with tracemalloc for
    the peak of Python allocations made during the build. Peak RSS is the child's VmHWM: Linux
    carries ru_maxrss across fork+exec, so a child of a big parent would report the parent's peak
    (this is also why this figure runs first); ru_maxrss is kept alongside for reference.
    """
    rows = []
    for n in (small, large):
        c = config_for(root, f"mem{n}", embed_model="hash:64")
        write_corpus(Path(c.root) / "corpus", n)
        rss = _probe(c, "rss")
        py = _probe(msgspec.structs.replace(c, db="db-trace", state_root="state-trace"), "trace")
        corpus_bytes = sum(p.stat().st_size for p in (Path(c.root) / "corpus").rglob("*.md"))
        rows.append({"docs": n, "chunks": rss["chunks"], "peak_rss_mb": (rss["hwm_kb"] or rss["maxrss_kb"]) / 1024,
                     "ru_maxrss_mb": rss["maxrss_kb"] / 1024, "py_peak_mb": py["py_peak"] / 2**20,
                     "manifest_mb": os.path.getsize(os.path.join(cfg.state_dir(c), state.MANIFEST_NAME)) / 2**20,
                     "corpus_mb": corpus_bytes / 2**20})
    a, b = rows
    growth = {k: b[k] - a[k] for k in ("peak_rss_mb", "py_peak_mb", "manifest_mb", "corpus_mb", "chunks")}
    return {"runs": rows, "growth": growth,
            "ratio_rss_vs_manifest_growth": growth["peak_rss_mb"] / growth["manifest_mb"],
            "ratio_py_vs_manifest_growth": growth["py_peak_mb"] / growth["manifest_mb"],
            "rss_growth_kb_per_chunk": growth["peak_rss_mb"] * 1024 / growth["chunks"]}


# ---- 4. upsert split -----------------------------------------------------------------

def bench_split(root: Path, upsert_batch: int | None) -> dict:
    """--upsert-batch above Chroma's limit must still work: Store.upsert cuts each group.

    The corpus is made of long documents of ~190-character paragraphs chunked at 200 chars,
    so it holds ~25% more chunks than the limit; Chroma's upsert calls are counted.
    """
    from chromadb.api.models.Collection import Collection

    opts = dict(embed_model="hash:64", chunk_chars=200, overlap_chars=0, min_chunk_chars=50)
    max_batch = store.open_store(config_for(root, "probe", **opts)).max_batch
    batch = upsert_batch if upsert_batch and upsert_batch > max_batch else 2 * max_batch
    c = config_for(root, "split", upsert_batch=batch, **opts)
    n_docs = -(-max_batch * 5 // 4 // 100)  # ~100 chunks per document
    write_corpus(Path(c.root) / "corpus", n_docs, sizes=((1.0, 19500, 19500),), para_chars=(150, 190))

    calls: list[int] = []

    def counted(real_upsert):
        def wrapped(self, *args, **kw):
            calls.append(len(kw["ids"]))
            return real_upsert(self, *args, **kw)
        return wrapped

    with spying(Collection, "upsert", counted):
        t0 = time.perf_counter()
        s = quiet_build(c)
        sec = time.perf_counter() - t0
    count = store.open_store(c).count()
    assert count == s.expected_chunks and max(calls) <= max_batch, (count, s.expected_chunks, calls)
    return {"max_batch": max_batch, "upsert_batch": batch, "chunks": s.chunks_upserted, "collection_count": count,
            "chroma_upsert_calls": len(calls), "largest_call": max(calls), "build_sec": sec, "ok": True}


# ---- report --------------------------------------------------------------------------

def table(r: dict) -> str:
    o, n, m, s = r["overhead"], r["noop"], r["memory"], r["split"]
    small, large = m["runs"]
    rows = [
        ("figure", "value", "target", "raw"),
        ("build / embed-only, wall (load excluded)", f"{o['ratio_build_vs_embed']:.3f}", "<= 1.10",
         f"best {o['build_minus_load_sec']:.2f} s / {o['embed_only_sec']:.2f} s; passes build "
         f"{_secs(o['build_minus_load_passes_sec'])}, embed {_secs(o['embed_only_passes_sec'])}; "
         f"{o['docs']} docs, {o['chunks']} chunks"),
        ("build / embed-only, CPU time", f"{o['ratio_build_vs_embed_cpu']:.3f}", "",
         f"{o['build_minus_load_cpu_sec']:.2f} s / {o['embed_only_cpu_sec']:.2f} s (best of each)"),
        ("build / its own encode calls, wall", f"{o['ratio_build_vs_own_encode']:.3f}", "",
         f"{o['build_minus_load_sec']:.2f} s / {o['build_encode_sec']:.2f} s (same pass)"),
        ("  model load (in build / standalone)", "", "", f"{o['build_model_load_sec']:.2f} s / "
         f"{o['standalone_model_load_sec']:.2f} s"),
        (f"no-op CLI run, {n['docs']} docs", f"{n['cli_noop_sec']:.2f} s", "~1 s",
         f"python start {n['python_startup_sec']:.2f} s; first build {n['first_build_sec']:.2f} s"),
        ("no-op in-process build()", f"{n['inprocess_noop_sec']:.2f} s", "", 
         f"embedder loads {n['inprocess_embedder_loads']}, chunks embedded {n['inprocess_chunks_embedded']}"),
        ("no-op CLI imported torch / FlagEmbedding", f"{n['cli_torch_imported']} / "
         f"{n['cli_flagembedding_imported']}", "False / False", ""),
        ("peak RSS growth / manifest growth", f"{m['ratio_rss_vs_manifest_growth']:.1f}", "small",
         f"{small['docs']}->{large['docs']} docs ({small['chunks']}->{large['chunks']} chunks): peak RSS "
         f"{small['peak_rss_mb']:.1f}->{large['peak_rss_mb']:.1f} MB (ru_maxrss {small['ru_maxrss_mb']:.1f}->"
         f"{large['ru_maxrss_mb']:.1f}), manifest {small['manifest_mb']:.2f}->{large['manifest_mb']:.2f} MB, "
         f"corpus {small['corpus_mb']:.1f}->{large['corpus_mb']:.1f} MB"),
        ("Python-heap peak growth / manifest growth", f"{m['ratio_py_vs_manifest_growth']:.1f}", "",
         f"tracemalloc peak {small['py_peak_mb']:.2f}->{large['py_peak_mb']:.2f} MB"),
        ("upsert split (batch > store max)", "ok" if s["ok"] else "FAILED", "ok",
         f"max_batch {s['max_batch']}, --upsert-batch {s['upsert_batch']}, {s['chunks']} chunks in "
         f"{s['chroma_upsert_calls']} Chroma calls (largest {s['largest_call']}), {s['build_sec']:.2f} s"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + " | " + row[3] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _secs(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, help="documents for the build-overhead corpus (default 150; quick 40)")
    ap.add_argument("--embed-batch", type=int, default=32, help="texts per forward pass (default 32)")
    ap.add_argument("--upsert-batch", type=int, default=256,
                    help="chunks per commit group (default 256); the split test uses it if above the store limit")
    ap.add_argument("--rounds", type=int, help="alternating embed-only/build rounds for figure 1 (default 2; quick 1)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run (~1 minute)")
    ap.add_argument("--report", metavar="FILE.json", help="also write all figures as JSON")
    args = ap.parse_args(argv)
    docs = args.docs or (40 if args.quick else 150)
    rounds = args.rounds or (1 if args.quick else 2)
    noop_docs, mem_sizes = (200, (100, 400)) if args.quick else (1000, (500, 2000))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-chroma-resume-") as tmp:
        root = Path(tmp)
        result = {"when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "quick": args.quick,
                  "loadavg_start": os.getloadavg()}
        # memory first: its children are spawned while this process is still small (see bench_memory)
        for name, run in (("memory", lambda: bench_memory(root, *mem_sizes)),
                          ("noop", lambda: bench_noop(root, noop_docs)),
                          ("split", lambda: bench_split(root, args.upsert_batch)),
                          ("overhead", lambda: bench_overhead(root, docs, args.embed_batch, args.upsert_batch,
                                                              rounds))):
            t0 = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            result[name] = run()
            print(f"[bench] {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    result["machine"] = _machine()  # imports torch, so only after the memory children ran
    result["total_sec"] = time.perf_counter() - started
    result["loadavg_end"] = os.getloadavg()
    print(f"{result['when']} · {result['machine']} · total {result['total_sec']:.0f} s · load average "
          f"{result['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at end")
    print(table(result))
    if args.report:
        Path(args.report).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__} threads {torch.get_num_threads()}, "
            f"Python {platform.python_version()}, {platform.system()}")


if __name__ == "__main__":
    sys.exit(main())
