"""What a reduced-precision backend costs in retrieval: the sample corpus built with each backend,
the golden questions asked of each, and how far each build's vectors moved from float32 torch's.

Run from the repository root with the project's venv:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_quality.py [--backends torch,onnx-int8,torch-bf16]

For each backend: `chroma-resume build` of examples/corpus into a fresh folder (its own state root,
so int8's export is made there), then `verify --queries examples/golden-queries.jsonl` at k = 1 and
k = 3 with `--report`, whose retrieval section gives recall@k and MRR overall and per language.
The vectors of each build are read back from Chroma and compared, chunk id by chunk id, with the
first backend's (least and mean cosine). Build wall times are printed too, but this corpus is
small: speed is bench_backends.py's job.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = REPO / "examples" / "golden-queries.jsonl"


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "chroma_resume", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"chroma-resume {' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done


def vectors(db: Path) -> dict:
    import chromadb
    import numpy as np
    got = chromadb.PersistentClient(path=str(db)).get_collection("docs").get(include=["embeddings"])
    return {i: np.asarray(e, dtype=np.float64) for i, e in zip(got["ids"], got["embeddings"])}


def measure(work: Path, backend: str) -> dict:
    folder = work / backend
    folder.mkdir()
    common = ["--docs", str(REPO / "examples" / "corpus"), "--backend", backend, "--progress", "off"]
    t0 = time.perf_counter()
    cli(["build", *common], folder)
    found = {"build_sec": time.perf_counter() - t0}
    for k in (1, 3):
        cli(["verify", *common, "--queries", str(QUESTIONS), "--top-k", str(k), "--report", f"k{k}.json"], folder)
        retrieval = json.loads((folder / f"k{k}.json").read_text())["retrieval"]
        found[f"k{k}"] = {"all": retrieval["overall"], **retrieval["by_lang"]}
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="torch,onnx-int8,torch-bf16",
                    help="comma-separated; the first is the reference for the cosines (default torch,onnx-int8,torch-bf16)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    a = ap.parse_args(argv)
    backends = a.backends.split(",")
    import numpy as np
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = Path(tmp)
        results = {b: measure(work, b) for b in backends}
        reference = vectors(work / backends[0] / ".chroma")
        for b in backends:
            got = vectors(work / b / ".chroma")
            assert sorted(got) == sorted(reference), f"{b}: other chunk ids than {backends[0]}"
            cos = np.array([got[i] @ reference[i] for i in reference])
            results[b]["cosine"] = {"min": float(cos.min()), "mean": float(cos.mean()), "chunks": len(cos)}
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %z')} · {len(reference)} chunks of examples/corpus · "
          f"{sum(1 for _ in QUESTIONS.open())} golden questions · cosine to {backends[0]}'s vectors, chunk by chunk")
    print("backend    | recall@1 all/en/zh | recall@3 all/en/zh | MRR@3 all/en/zh   | cosine least/mean | build")
    for b, r in results.items():
        def triple(k: str, key: str) -> str:
            return "/".join(f"{r[k][lang][key]:.3f}" if lang in r[k] else "-" for lang in ("all", "en", "zh"))
        print(f"{b:<10} | {triple('k1', 'recall')} | {triple('k3', 'recall')} | {triple('k3', 'mrr')} | "
              f"{r['cosine']['min']:.5f}/{r['cosine']['mean']:.5f} | {r['build_sec']:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
