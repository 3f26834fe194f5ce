"""How often `verify --deep`'s findable check would fail a healthy index, and whether it catches a damaged one.

The corpus is the one that made the old check (an exact self-hit in the top 10) fail healthy indexes:
1,500 one-paragraph pages and 500 identical stub pages. Each (embedder, space) pair is built by the
real CLI into its own collection (one embedding cache, so the model pays once), then every row is
searched for with its own vector, as `verify --deep all` does, and compared with exact search
(verify's own `_Findable`). Then the HNSW graph's level-0 links are zeroed in the segment file
(damage a power cut or a bad copy could do: the rows are intact, the graph is not) and the same is
measured again: a check worth having passes the first and fails the second.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/findable.py [--embedders hash:32 default] [--spaces cosine l2 ip]

Prints one row per (embedder, space, index state): recall@10 against exact search, rows not returned
for their own vector (the old check's failures), of those with none of their exact neighbours, and
the verdict. With the default model the first build embeds 2,000 chunks (about 3 minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from chroma_resume import config as cfg  # noqa: E402
from chroma_resume import store  # noqa: E402
verify = importlib.import_module("chroma_resume.verify")  # the module; chroma_resume.verify is the API
from chroma_resume.verify import NEIGHBOURS, RECALL_FLOOR, _Findable, _Space  # noqa: E402

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud harbor lantern "
         "meadow orbit signal vector index chunk").split()


def stub_corpus(folder: Path, pages: int = 1500, stubs: int = 500) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for i in range(pages):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 120)))
        (folder / f"page{i:04d}.md").write_text(text + ".\n")
    for i in range(stubs):
        (folder / f"stub{i:04d}.md").write_text("This page is a stub. You can help by expanding it.\n")


def build(root: Path, options: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "chroma_resume", "build", *options], cwd=root, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, done.stdout + done.stderr


def measure(c: cfg.Config) -> _Findable:
    """Every row searched for with its own vector, as `verify --deep all` does, recall measured on every row
    (verify measures it on the first RECALL_ROWS of its sample, to bound the cost of exact search)."""
    verify.RECALL_ROWS = 10**9
    db = store.open_store(c)
    rows = list(db.scan(include=("embeddings",)))
    ids = [r["id"] for r in rows]
    vectors = [np.asarray(r["embedding"], dtype=np.float32) for r in rows]
    found = _Findable(_Space(ids, vectors), c.hnsw_space, min(NEIGHBOURS, len(ids)))
    for lo in range(0, len(ids), 64):
        found.add(db, ids[lo:lo + 64], vectors[lo:lo + 64])
    return found


def zero_links(db_folder: Path) -> int:
    """Set every element's level-0 neighbour count to 0 in hnswlib's data_level0.bin (M=16: 32 links)."""
    segment = glob.glob(str(db_folder / "*" / "data_level0.bin"))[0]
    data = bytearray(Path(segment).read_bytes())
    dim = None
    for candidate in (32, 384, 768, 1024):  # size per element = 4 + 32*4 links + 4*dim + 8 label
        if len(data) % (4 + 128 + 4 * candidate + 8) == 0:
            dim = candidate
            break
    size = 4 + 128 + 4 * dim + 8
    for element in range(len(data) // size):
        data[element * size:element * size + 4] = b"\0\0\0\0"
    Path(segment).write_bytes(bytes(data))
    return len(data) // size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embedders", nargs="+", default=["hash:32", "default"])
    ap.add_argument("--spaces", nargs="+", default=["cosine", "l2", "ip"])
    o = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="findable-"))
    stub_corpus(work / "corpus")
    print(f"{'embedder':10} {'space':7} {'index':8} {'recall@10':>9} {'not self':>8} {'astray':>6} "
          f"{'unsearchable':>12}  verdict (floor {RECALL_FLOOR})")
    for embedder in o.embedders:
        for space in o.spaces:
            name = f"{embedder.replace(':', '')}-{space}"
            options = ["--docs", "corpus", "--collection", name, "--hnsw-space", space, "--db", f"db-{name}",
                       "--progress", "off", "--embed-cache", str(work / "cache.sqlite3")]
            options += [] if embedder == "default" else ["--embed-model", embedder]
            started = time.monotonic()
            build(work, options)
            c = cfg.make_config(root=str(work), docs="corpus", collection=name, hnsw_space=space, db=f"db-{name}",
                                **({} if embedder == "default" else {"embed_model": embedder}))
            for state in ("healthy", "damaged"):
                if state == "damaged":
                    zero_links(work / f"db-{name}")
                    # a fresh process reads the damaged files (this one's client has the index in memory)
                    result = subprocess.run([sys.executable, __file__, "--one", str(work), name, space, embedder],
                                            capture_output=True, text=True)
                    print(result.stdout.rstrip() or result.stderr[-2000:])
                    continue
                f = measure(c)
                print(f"{embedder:10} {space:7} {state:8} {f.recall:9.4f} {f.not_first_hand:8d} {f.astray:6d} "
                      f"{len(f.lost):12d}  {'pass' if f.ok else 'FAIL'}   (build {time.monotonic() - started:.0f}s)",
                      flush=True)
    print(f"work folder: {work}")


def one(work: str, name: str, space: str, embedder: str) -> None:
    c = cfg.make_config(root=work, docs="corpus", collection=name, hnsw_space=space, db=f"db-{name}",
                        **({} if embedder == "default" else {"embed_model": embedder}))
    f = measure(c)
    print(f"{embedder:10} {space:7} {'damaged':8} {f.recall:9.4f} {f.not_first_hand:8d} {f.astray:6d} "
          f"{len(f.lost):12d}  {'pass' if f.ok else 'FAIL'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(*sys.argv[2:6])
    else:
        main()
