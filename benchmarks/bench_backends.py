"""Cold builds by backend against FlagModel.encode and sentence-transformers: whole processes, alternated.

Run from the repository root with the project's venv:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backends.py [--quick] [--rounds 3] [--sides floor,default]
                                                                  [--json FILE.json]

On the bench_build.py corpus (same generator, same seed), each round runs, in an order rotated
from round to round so a burst of other work on the shared machine hits each side in turn:
  floor     a fresh process: `FlagModel.encode` in float32 of exactly the chunk texts a build embeds;
  default   `chroma-resume build` with no backend option (auto: the fastest checked path; on a CPU
            with bfloat16 units torch in bf16, its probe check paid in every run since each has a
            fresh state root; else float32 through the checked ONNX export, made before the rounds),
            a fresh db, state root and empty embedding cache;
  torch     the same with `--backend torch` (float32, the reference);
  bf16      the same with `--backend torch-bf16`;
  onnx      the same with `--backend onnx` (the float32 export, made before the rounds);
  sbert     a fresh process: `SentenceTransformer(model).encode(texts, normalize_embeddings=True)`
            (the runtime LangChain's HuggingFace embeddings use), same max length and batch;
  int8      the same as default with `--backend onnx-int8` (the export quantized; a schema of its own).
The first export (torch load, export, probe check, in a fresh process) is measured once, before
the rounds, when a side needs it, and a cold build that pays for it once, after them. Figures are
medians over the rounds, ratios of medians; every pass and the load average around it are printed.
The vectors of every side's last run are compared with the floor's: least and mean cosine over all
chunks. The header names the CPU, its vector flags and what --backend auto runs on it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_build as bb  # noqa: E402  (standard library only at its top)

HERE = Path(__file__).resolve()
SIDES = ("floor", "default", "torch", "bf16", "onnx", "sbert", "int8")
BACKENDS = {"torch": "torch", "bf16": "torch-bf16", "onnx": "onnx", "int8": "onnx-int8"}  # side -> --backend
BUILDS = ("default", *BACKENDS)  # the sides that are chroma-resume builds


# ---- workers (`bench_backends.py worker NAME JSON`, each in a fresh process) -------------

def worker_export(a: dict) -> dict:
    """The first export of the model beside an embedding cache: torch load, export, probe check
    (backend onnx); or its quantization and check, the float32 export made already (onnx-int8)."""
    from chroma_resume.config import make_config
    from chroma_resume.embedders import onnx_runtime
    from chroma_resume.reporting import Warnings

    c = make_config(root=a["root"], embed_cache=a["cache"], backend=a["backend"])
    warn = Warnings()
    embedder = onnx_runtime.load(c, warn)
    meta = embedder.meta
    return {"backend": type(embedder).__name__, "warnings": warn.count, "export_sec": meta.export_sec,
            "check_sec": meta.check_sec, "worst_cosine": meta.worst_cosine, "onnx_mb": meta.onnx_bytes / 2**20,
            "versions": meta.versions}


def worker_sbert(a: dict) -> dict:
    """sentence-transformers on the same texts, max length and batch size, normalized."""
    t0 = time.perf_counter()
    from sentence_transformers import SentenceTransformer
    t1 = time.perf_counter()
    model = SentenceTransformer(a["model"], device="cpu")
    model.max_seq_length = a["max_length"]
    t2 = time.perf_counter()
    texts = json.loads(Path(a["texts"]).read_text(encoding="utf-8"))
    vectors = model.encode(texts, batch_size=a["batch"], normalize_embeddings=True, show_progress_bar=False)
    t3 = time.perf_counter()
    import numpy as np
    np.save(a["save"], vectors)
    return {"import_sec": t1 - t0, "load_sec": t2 - t1, "encode_sec": t3 - t2, "shape": list(vectors.shape)}


def worker_compare(a: dict) -> dict:
    """Least (and mean) cosine to the floor's vectors: of each build's collection (matched by chunk
    text) and of sbert's."""
    import chromadb
    import numpy as np

    texts = json.loads(Path(a["texts"]).read_text(encoding="utf-8"))
    floor = np.load(a["floor"]).astype(np.float64)

    def cosines(vectors) -> dict:
        got = np.einsum("ij,ij->i", np.asarray(vectors, dtype=np.float64), floor)
        return {"min": float(got.min()), "mean": float(got.mean())}

    found = {"chunks": len(texts)}
    for side, db in a["dbs"].items():
        got = chromadb.PersistentClient(path=db).get_collection("bench").get(include=["documents", "embeddings"])
        by_text = dict(zip(got["documents"], got["embeddings"]))
        found[side] = cosines([by_text[t] for t in texts])
    if a.get("sbert"):
        found["sbert"] = cosines(np.load(a["sbert"]))
    return found


WORKERS = {"export": worker_export, "sbert": worker_sbert, "compare": worker_compare, "floor": bb.worker_floor}


# ---- the measurements ------------------------------------------------------------------

def measure(root: Path, a: argparse.Namespace) -> dict:
    from chroma_resume import config as cfg
    from chroma_resume import embedders, models

    batch = a.embed_batch or bb.CPU_BATCH
    r = bb.Runner(root, ("--embed-batch", str(batch)), script=HERE)
    runs: dict = {}
    files = bb.write_corpus(root / "corpus", a.docs)
    c = cfg.make_config(root=str(root), docs="corpus")
    texts = bb.chunk_texts(c)
    (root / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    common = {"model": models.location(c), "batch": batch, "texts": str(root / "texts.json"),
              "max_length": models.effective_max_length(c)}
    floor = {**common, "pooling": models.pooling(c), "device": "cpu", "fp16": False, "save": str(root / "floor.npy")}
    runs["corpus"] = {"docs": len(files), "chunks": len(texts), "max_length": common["max_length"], "batch": batch}
    shared = root / "shared"  # where every default build's embedding cache lives, so the export beside it
    shared.mkdir()
    runs["machine"] = machine(c)
    if {"onnx", "int8"} & set(a.sides) or ("default" in a.sides and embedders.choose(c).runtime == "onnx"):
        runs["export"] = r.worker("export", {"root": str(root), "cache": str(shared / "cache-export.sqlite3"),
                                             "backend": "onnx"})
    if "int8" in a.sides:
        runs["quantize"] = r.worker("export", {"root": str(root), "cache": str(shared / "cache-export.sqlite3"),
                                               "backend": "onnx-int8"}, "quantize")

    for i in range(a.rounds):
        for side in a.sides[i % len(a.sides):] + a.sides[:i % len(a.sides)]:
            name = f"{side}-{i}"
            if side == "floor":
                runs[name] = r.worker("floor", floor, name)
            elif side == "sbert":
                runs[name] = r.worker("sbert", {**common, "save": str(root / "sbert.npy")}, name)
            else:  # a build; its cache beside the shared export, empty
                backend = ("--backend", BACKENDS[side]) if side in BACKENDS else ()
                runs[name] = r.build(name, f"runs/{name}", "--embed-cache", str(shared / f"cache-{name}.sqlite3"),
                                     *backend)
            if side in BUILDS:
                assert runs[name]["summary"]["chunks_embedded"] == len(texts), (name, runs[name]["summary"])
    if a.first_build and "export" in runs:
        runs["first"] = r.build("first", "runs/first", "--backend", "onnx")  # a fresh state root: exports, checks
    last = a.rounds - 1
    runs["compare"] = r.worker("compare", {
        "texts": str(root / "texts.json"), "floor": floor["save"],
        "sbert": str(root / "sbert.npy") if "sbert" in a.sides else None,
        "dbs": {side: str(root / f"runs/{side}-{last}/db") for side in BUILDS if side in a.sides}})
    return runs


def machine(c) -> dict:
    """The CPU, its vector flags, and what --backend auto runs on it (and why)."""
    from chroma_resume.embedders import select
    return {"cpu": select.machine_kind("cpu"), "bf16_evidence": select.bf16_evidence(),
            "auto": select.describe(c)}


def _median(runs: dict, side: str, key: str = "wall_sec") -> float:
    return statistics.median(v[key] for k, v in runs.items() if k.rsplit("-", 1)[0] == side and k[-1].isdigit())


def _passes(runs: dict, side: str) -> str:
    return "/".join(f"{v['wall_sec']:.1f}" for k, v in runs.items() if k.rsplit("-", 1)[0] == side and k[-1].isdigit())


def _loads(runs: dict, side: str) -> str:
    return "/".join(f"{v['load_before']:.1f}" for k, v in runs.items() if k.rsplit("-", 1)[0] == side and k[-1].isdigit())


LABELS = {"default": ("cold build, default options (--backend auto) / floor", "<= 0.70"),
          "torch": ("cold build, --backend torch (float32) / floor", "<= 1.00"),
          "bf16": ("cold build, --backend torch-bf16 / floor", ""),
          "onnx": ("cold build, --backend onnx (float32 export) / floor", ""),
          "sbert": ("sentence-transformers encode / floor", ""),
          "int8": ("cold build, --backend onnx-int8 / floor", "")}


def figures(runs: dict, sides: tuple[str, ...]) -> tuple[list[tuple[str, ...]], dict]:
    wall = {side: _median(runs, side) for side in sides}
    cpu = {side: _median(runs, side, "cpu_sec") for side in sides}
    corpus = runs["corpus"]
    others = [side for side in sides if side != "floor"]
    ratios = {f"{side}_vs_floor": wall[side] / wall["floor"] for side in others}
    ratios.update({f"{side}_vs_floor_cpu": cpu[side] / cpu["floor"] for side in others})
    paired = "/".join(f"{runs[f'default-{i}']['wall_sec'] / runs[f'floor-{i}']['wall_sec']:.2f}"
                      for i in range(sum(1 for k in runs if k.startswith("floor-"))))
    rows = [("floor: FlagModel.encode float32, fresh process", f"{wall['floor']:.1f} s", "",
             f"median; passes {_passes(runs, 'floor')}; CPU {cpu['floor']:.0f} s; {corpus['chunks']} chunks of "
             f"{corpus['docs']} docs, max_length {corpus['max_length']}, batch {corpus['batch']}", _loads(runs, "floor"))]
    for side in others:
        label, target = LABELS[side]
        rows.append((label, f"{ratios[f'{side}_vs_floor']:.3f}", target,
                     f"{wall[side]:.1f} s / {wall['floor']:.1f} s (medians); passes {_passes(runs, side)}; CPU "
                     f"{cpu[side]:.0f} s = {ratios[f'{side}_vs_floor_cpu']:.3f}"
                     + (f"; paired per round {paired}" if side == "default" else ""), _loads(runs, side)))
    if "export" in runs:
        ex = runs["export"]
        ratios.update(first_export_sec=ex["wall_sec"], worst_probe_cosine=ex["answer"]["worst_cosine"])
        rows.append(("first export (fresh process)", f"{ex['wall_sec']:.1f} s", "once per model",
                     f"export {ex['answer']['export_sec']:.1f} s + probe check {ex['answer']['check_sec']:.1f} s "
                     f"(worst probe cosine {ex['answer']['worst_cosine']:.7f}), rest torch import and model load; "
                     f"model.onnx {ex['answer']['onnx_mb']:.0f} MB", f"{ex['load_before']:.1f}"))
    if "quantize" in runs:
        q = runs["quantize"]
        rows.append(("first int8 quantization (fresh process)", f"{q['wall_sec']:.1f} s", "once per model",
                     f"quantize {q['answer']['export_sec']:.1f} s + check {q['answer']['check_sec']:.1f} s against the "
                     f"float32 export (worst probe cosine {q['answer']['worst_cosine']:.4f}); model.onnx "
                     f"{q['answer']['onnx_mb']:.0f} MB", f"{q['load_before']:.1f}"))
    if "first" in runs:
        rows.append(("cold build paying the first export", f"{runs['first']['wall_sec']:.1f} s", "",
                     "fresh state root, --backend onnx", f"{runs['first']['load_before']:.1f}"))
    if "compare" in runs:
        cmp_ = runs["compare"]["answer"]
        for side in others:
            if side in cmp_:
                ratios[f"{side}_min_cos"], ratios[f"{side}_mean_cos"] = cmp_[side]["min"], cmp_[side]["mean"]
                target = "" if side == "int8" else ">= 0.9999"
                rows.append((f"{side}: cosine to FlagModel.encode", f"{cmp_[side]['min']:.6f}", target,
                             f"least; mean {cmp_[side]['mean']:.6f} over all {cmp_['chunks']} chunks", ""))
    return rows, ratios


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="24 documents, 1 round")
    ap.add_argument("--docs", type=int, help="documents of the corpus (default 100; quick 24)")
    ap.add_argument("--rounds", type=int, help="alternating rounds of the sides (default 3; quick 1)")
    ap.add_argument("--sides", default=",".join(SIDES),
                    help=f"comma-separated sides to run, floor among them (default {','.join(SIDES)})")
    ap.add_argument("--no-first-build", dest="first_build", action="store_false",
                    help="skip the cold build that pays the first export (the export is measured alone anyway)")
    ap.add_argument("--embed-batch", type=int, help=f"texts per forward pass, every side (default {bb.CPU_BATCH})")
    ap.add_argument("--json", metavar="FILE", help="also write every figure and process record as JSON")
    ap.add_argument("--commit", metavar="REV", help="measure this commit's src/ (default: the working tree)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args(argv)
    a.docs = a.docs or (24 if a.quick else 100)
    a.rounds = a.rounds or (1 if a.quick else 3)
    a.sides = tuple(side for side in SIDES if side in a.sides.split(","))
    if "floor" not in a.sides or "default" not in a.sides:
        ap.error("--sides must include floor and default")
    started, when = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %z")
    commit, runs = bb.in_work_folder("bench-backends-", a, measure)
    rows, ratios = figures(runs, a.sides)
    m = runs["machine"]
    print(f"{when} · commit {commit} · {os.cpu_count()} cores · total {time.perf_counter() - started:.0f} s · "
          f"load average (1 min) before each pass in the load column\n{m['cpu']}\nbfloat16 units: "
          f"{m['bf16_evidence'] or 'none'} · --backend auto runs {m['auto']}")
    print(bb.render(rows))
    if a.json:
        bb.write_json(a.json, rows, runs, when=when, commit=commit, options=vars(a), ratios=ratios)
    return 0


if __name__ == "__main__":
    sys.exit(bb.entry(WORKERS, main))
