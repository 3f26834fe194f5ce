"""Benchmark chroma-resume against FlagEmbedding itself: whole processes, one run.

Run from the repository root with the project's venv:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_build.py [--quick] [--json FILE.json]

Every figure is the wall time of a fresh process (interpreter start, imports and model
load included), so the build is compared with what a user would otherwise run: a script
that loads `FlagModel` and calls `encode` on the same chunk texts (DESIGN §12). Helpers
that must not share this process's imports run as `bench_build.py worker NAME JSON`.
This module imports only the standard library at the top, so this process stays small
(Linux carries a parent's peak RSS into its children's ru_maxrss) and the floor process
pays only for FlagEmbedding. No timing assertions: targets are printed for the reader.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
HEAVY_MODULES = ("torch", "FlagEmbedding", "transformers")
CPU_BATCH, CUDA_BATCH = 32, 256  # texts per forward pass, both sides (the build's defaults)

# ---- corpus: text whose characters per token vary like real documents -----------------

EN = ("the of and to in is that for it as with was on be by this are from or have an they which one you "
      "all were her she there would their we him been has when who will more no if out so said what up its "
      "about into than them can only other new some could time these two may then do first any my now such "
      "like our over man me even most made after also did many before must through back years where much "
      "your way well down should because each just those people how too little state good very make world "
      "still own see men work long get here between both life being under never day same another know while "
      "last might us great old year off come since against go came right used take three index vector build "
      "chunk query model embedding document cache resume crash commit batch upsert manifest schema server "
      "token window overlap boundary throughput latency memory process storage recovery").split()
ZH = ("数据 模型 向量 索引 文档 查询 系统 用户 性能 存储 计算 结果 方法 问题 时间 服务 网络 缓存 构建 恢复 写入 日志 "
      "检索 语义 分块 嵌入 批量 进程 内存 磁盘 我们 可以 需要 通过 如果 因为 所以 但是 以及 其中 每个 一个 这个 "
      "使用 支持 保证 提高 减少 重新 完成 已经 没有 不会 中断 之后 之前 同时 对于 根据 相同 不同 文本 长度 字符").split()
IDENTS = ("value items index count result config path batch chunk vector store cache model text total offset "
          "limit size name key doc ids rows state log writer reader buffer").split()


def _sentence(rng: random.Random, lo: int = 6, hi: int = 22) -> str:
    return " ".join(rng.choice(EN) for _ in range(rng.randint(lo, hi))).capitalize() + rng.choice("...?;")


def prose(rng: random.Random) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(3, 8)))


def cjk(rng: random.Random) -> str:
    return "".join("".join(rng.choice(ZH) for _ in range(rng.randint(5, 14))) + rng.choice("。，。！；")
                   for _ in range(rng.randint(4, 12)))


def code(rng: random.Random) -> str:
    name, args = "_".join(rng.sample(IDENTS, 2)), ", ".join(rng.sample(IDENTS, rng.randint(1, 3)))
    body = [f"def {name}({args}):", f'    """{_sentence(rng, 4, 10)}"""', f"    {rng.choice(IDENTS)} = []"]
    for _ in range(rng.randint(3, 12)):
        a, b, c = rng.sample(IDENTS, 3)
        body.append(rng.choice((f"    for {a} in {b}[{rng.randint(0, 9)}:]:\n"
                                f"        {c}.append({a} * {rng.randint(2, 64)})",
                                f"    if {a} > {rng.randint(1, 999)} and not {b}:\n"
                                f"        return {c}.get({a!r}, None)",
                                f"    {a} = {{'{b}': {rng.random():.4f}, '{c}': len({b})}}")))
    body.append(f"    return {rng.choice(IDENTS)}")
    return "```python\n" + "\n".join(body) + "\n```"


def table(rng: random.Random) -> str:
    cols = rng.sample(IDENTS, rng.randint(3, 6))
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _ in range(rng.randint(4, 14)):
        rows.append("| " + " | ".join(rng.choice((f"{rng.randint(0, 99999)}", f"{rng.random() * 100:.2f}%",
                                                  f"v{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
                                                  rng.choice(EN), rng.choice(ZH))) for _ in cols) + " |")
    return "\n".join(rows)


def mixed(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 7)):
        parts.append(rng.choice((_sentence(rng), f"`{rng.choice(IDENTS)}={rng.randint(1, 512)}`",
                                 "".join(rng.sample(ZH, 3)) + "。", f"({rng.choice(ZH)}: {rng.choice(EN)})")))
    return " ".join(parts)


BLOCKS = {"prose": prose, "cjk": cjk, "code": code, "table": table, "mixed": mixed}
# document kind: (share of documents, weights of its blocks in BLOCKS order)
KINDS = {"prose": (0.35, (8, 0, 0, 1, 1)), "cjk": (0.2, (1, 8, 0, 1, 1)), "code": (0.2, (3, 0, 5, 1, 1)),
         "table": (0.1, (2, 1, 0, 6, 1)), "mixed": (0.15, (2, 2, 2, 1, 3))}
SIZES = ((0.3, 800, 3000), (0.5, 5000, 15000), (0.2, 20000, 40000))  # (share, min chars, max chars)


def _pick(rng: random.Random, shares):
    x = rng.random()
    for share, *rest in shares:
        x -= share
        if x <= 0:
            return rest
    return rest


def document(rng: random.Random, kind: str, chars: int) -> str:
    """A markdown document of `kind`: headings over paragraphs of mixed block kinds."""
    weights = KINDS[kind][1]
    out, size = [f"# {_sentence(rng, 2, 6)[:-1]}"], 0
    while size < chars:
        if rng.random() < 0.12:
            out.append(f"## {_sentence(rng, 2, 5)[:-1]}")
        out.append(rng.choices(list(BLOCKS.values()), weights)[0](rng))
        size += len(out[-1]) + 2
    return "\n\n".join(out) + "\n"


def write_corpus(folder: Path, n: int, seed: int = 7, sizes=SIZES) -> list[Path]:
    """n documents of the KINDS mix and SIZES mix (fixed seed: the same corpus every run)."""
    rng = random.Random(seed)
    files = []
    for i in range(n):
        kind = _pick(rng, [(share, name) for name, (share, _) in KINDS.items()])[0]
        lo, hi = _pick(rng, sizes)
        path = folder / f"d{i // 500:03d}" / f"{kind}-{i:05d}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(document(rng, kind, rng.randint(lo, hi)), encoding="utf-8")
        files.append(path)
    return files


def edit_corpus(files: list[Path], share: float, seed: int = 3) -> dict:
    """Edit `share` of the documents (one word inserted mid-text) and append a paragraph to the
    longest one: what an incremental build must re-embed is only the chunks whose text changed."""
    rng = random.Random(seed)
    longest = max(files, key=lambda f: f.stat().st_size)
    edited = rng.sample([f for f in files if f != longest], max(1, round(len(files) * share)))
    for f in edited:
        text = f.read_text(encoding="utf-8")
        cut = max(text.find(" ", len(text) // 2), len(text) // 2)
        f.write_text(text[:cut] + " edited" + text[cut:], encoding="utf-8")
    with longest.open("a", encoding="utf-8") as fh:
        fh.write("\n" + prose(rng) + "\n")
    return {"edited": len(edited), "appended": 1, "files": [*edited, longest]}


# ---- whole processes -------------------------------------------------------------------

def loadavg() -> float:
    with open("/proc/loadavg") as fh:
        return float(fh.read().split()[0])


class Runner:
    """Starts fresh processes and records, per process: wall seconds from spawn to exit, CPU
    seconds and peak RSS from its own wait4 rusage, and the 1-minute load average around it."""

    def __init__(self, root: Path, build_options: tuple[str, ...] = (), script: Path = HERE):
        self.root, self.logs, self.build_options = root, root / "logs", build_options
        self.script = script  # the file whose WORKERS answer `worker NAME JSON`
        self.logs.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, argv: list[str], env: dict | None = None) -> dict:
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        before = loadavg()
        t0 = time.perf_counter()
        with out.open("w") as fo, err.open("w") as fe:
            proc = subprocess.Popen(argv, cwd=self.root, env=env or ENV, stdout=fo, stderr=fe)
            _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        print(f"[bench] {name}: {wall:.1f} s, CPU {usage.ru_utime + usage.ru_stime:.1f} s, load {before:.1f}, "
              f"rc {proc.returncode}", file=sys.stderr, flush=True)
        return {"name": name, "rc": proc.returncode, "wall_sec": wall, "cpu_sec": usage.ru_utime + usage.ru_stime,
                "peak_rss_mb": usage.ru_maxrss / 1024, "load_before": before, "load_after": loadavg(),
                "stdout": out.read_text(), "stderr_file": str(err)}

    def worker(self, name: str, args: dict, label: str | None = None) -> dict:
        """A helper of this file in a fresh process; its JSON answer lands in result['answer']."""
        r = self.run(label or name, [sys.executable, str(self.script), "worker", name, json.dumps(args)])
        if r["rc"] != 0:
            raise RuntimeError(f"worker {name} failed (rc {r['rc']}):\n{_tail(r['stderr_file'])}")
        r["answer"] = json.loads(r["stdout"].rsplit("@@", 1)[1])
        return r

    def build(self, name: str, dirs: str, *options: str, env: dict | None = None, docs: str = "corpus",
              expect_rc: int = 0, python: tuple[str, ...] = ()) -> dict:
        """`python -m chroma_resume build` into root/dirs/{db,state}; the summary lines parsed."""
        argv = [sys.executable, *python, "-m", "chroma_resume", "build", "--root", str(self.root), "--docs", docs,
                "--db", f"{dirs}/db", "--state-root", f"{dirs}/state", "--collection", "bench", "--progress", "off",
                *self.build_options, *options]
        r = self.run(name, argv, env)
        if r["rc"] != expect_rc:
            raise RuntimeError(f"{name}: exit {r['rc']} (expected {expect_rc}):\n{_tail(r['stderr_file'])}")
        r["summary"] = {k: _number(v) for k, v in re.findall(r"^(\w+)=(\S*)$", r["stdout"], re.M)}
        stage = next((line for line in r["stdout"].splitlines() if line.startswith("[STAGE]")), "")
        r["stage"] = {k: _number(v) for k, v in re.findall(r"(\w+)=(\S+)", stage)}
        return r


def _tail(path: str, lines: int = 15) -> str:
    """The end of a failed process's stderr: the work folder is removed unless --keep."""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def heavy_imports(runner: Runner, name: str, dirs: str, docs: str) -> list[str]:
    """Which of HEAVY_MODULES a (no-op) build imported, from `python -X importtime`."""
    r = runner.build(name, dirs, docs=docs, python=("-X", "importtime"))
    seen = set(re.findall(r"^import time:.*\|\s*(\w+)", Path(r["stderr_file"]).read_text(), re.M))
    return [m for m in HEAVY_MODULES if m in seen]


# ---- workers: run in their own process (`bench_build.py worker NAME JSON`) ----------------

def worker_probe(a: dict) -> dict:
    """The machine as torch sees it (whether the GPU rows can run), and which chroma_resume is measured."""
    import torch

    import chroma_resume
    cuda = torch.cuda.is_available()
    return {"chroma_resume": os.path.dirname(chroma_resume.__file__), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cuda": cuda, "gpu": torch.cuda.get_device_name(0) if cuda else None}


def worker_floor(a: dict) -> dict:
    """The floor (DESIGN §12): the library's own call on the same texts, batch size and max_length."""
    t0 = time.perf_counter()
    from FlagEmbedding import FlagModel
    t1 = time.perf_counter()
    model = FlagModel(a["model"], pooling_method=a["pooling"], normalize_embeddings=True, use_fp16=a["fp16"],
                      devices=a["device"], batch_size=a["batch"], passage_max_length=a["max_length"])
    t2 = time.perf_counter()
    texts = json.loads(Path(a["texts"]).read_text(encoding="utf-8"))
    vectors = model.encode(texts)
    t3 = time.perf_counter()
    if a.get("save"):  # for a comparison of vectors, outside the timed part
        import numpy as np
        np.save(a["save"], vectors)
    return {"import_sec": t1 - t0, "load_sec": t2 - t1, "encode_sec": t3 - t2, "shape": list(vectors.shape)}


def worker_cache(a: dict) -> dict:
    """Fill the cache of a state root with `entries` random vectors under the real model's
    fingerprint (the texts given first), then time get_many in the build's group size."""
    import numpy as np

    from chroma_resume import cache, models
    from chroma_resume.config import make_config

    c = make_config(root=a["root"], state_root=a["state_root"])
    texts = json.loads(Path(a["texts"]).read_text(encoding="utf-8"))
    texts += [f"filler {i}: {texts[i % len(texts)]}" for i in range(a["entries"] - len(texts))]
    db = cache.open_cache(c, models.model_fingerprint(c), lambda *args, **kw: print(args, kw, file=sys.stderr))
    rng, step = np.random.default_rng(0), c.upsert_batch
    t0 = time.perf_counter()
    for lo in range(0, len(texts), step):
        v = rng.standard_normal((len(texts[lo:lo + step]), a["dim"]), dtype=np.float32)
        db.put_many(texts[lo:lo + step], v / np.linalg.norm(v, axis=1, keepdims=True))
    t1 = time.perf_counter()
    hits = sum(len(db.get_many(texts[lo:lo + step])) for lo in range(0, len(texts), step))
    t2 = time.perf_counter()
    db.close()
    return {"entries": len(texts), "group": step, "fill_sec": t1 - t0, "get_sec": t2 - t1, "hits": hits,
            "lookups_per_sec": len(texts) / (t2 - t1)}


def worker_store(a: dict) -> dict:
    """A collection of `n` random vectors inserted straight into Chroma; then the final reconcile's
    id scan (Store.all_ids) and the durable finish (store's own function if it has one, else an
    fsync of every file and folder of the PersistentClient folder)."""
    import numpy as np

    from chroma_resume import store
    from chroma_resume.config import make_config

    c = make_config(root=a["root"], db=a["db"], collection="bench")
    s = store.open_store(c, schema="bench")
    rng, n = np.random.default_rng(0), a["n"]
    t0 = time.perf_counter()
    for lo in range(0, n, s.max_batch):
        hi = min(n, lo + s.max_batch)
        s.collection.add(ids=[f"{i // 10:016x}:{i:012x}:{i % 10}" for i in range(lo, hi)],
                         embeddings=rng.random((hi - lo, a["dim"]), dtype=np.float32))
    t1 = time.perf_counter()
    ids = s.all_ids()
    t2 = time.perf_counter()
    assert len(ids) == n, len(ids)
    durable = getattr(store, "make_durable", None)
    finish = (lambda: durable(c)) if durable else (lambda: fsync_tree(os.path.join(a["root"], a["db"])))
    passes = []
    for _ in range(2):  # first: what the inserts left dirty; second: the walk alone
        t = time.perf_counter()
        finish()
        passes.append(time.perf_counter() - t)
    files = [p for p in Path(a["root"], a["db"]).rglob("*") if p.is_file()]
    return {"n": n, "insert_sec": t1 - t0, "all_ids_sec": t2 - t1, "durable_by": "store.make_durable" if durable
            else "bench fsync of every file and folder", "durable_sec": passes[0], "durable_again_sec": passes[1],
            "files": len(files), "mb": sum(p.stat().st_size for p in files) / 2**20}


def fsync_tree(top: str) -> None:
    """fsync every file, then every folder (deepest first), under top: what a durable finish costs."""
    for folder, _dirs, names in os.walk(top, topdown=False):
        for name in [*names, "."]:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


WORKERS = {"probe": worker_probe, "floor": worker_floor, "cache": worker_cache, "store": worker_store}


# ---- the measurements ------------------------------------------------------------------

def chunk_texts(c, only: set[str] | None = None) -> list[str]:
    """Exactly the texts a cold build embeds: the project's own scan and chunker, the build's parameters."""
    from chroma_resume import corpus
    from chroma_resume.chunking import chunk_text

    return [t for d in corpus.scan(c, lambda *a, **k: None, only=only)
            for t in chunk_text(d.text, c.chunk_chars, c.overlap_chars, c.min_chunk_chars)]


def cache_entries(state_root: Path) -> int:
    """Rows in a state root's embedding cache (after a kill: what the killed run had paid for)."""
    with sqlite3.connect(state_root / "embed-cache.sqlite3") as db:
        return db.execute("SELECT count(*) FROM vectors").fetchone()[0]


def measure(root: Path, a: argparse.Namespace) -> dict:
    """Every scenario of the issue, each a fresh process; returns the raw records by label."""
    from chroma_resume import config as cfg
    from chroma_resume import models

    batch = a.embed_batch or CPU_BATCH  # given to both sides: the build's default may change, and differs on CUDA
    # torch, as before the ONNX backend: these figures are the pipeline against FlagModel.encode on the
    # same runtime; bench_backends.py measures the default backend (ONNX Runtime on a CPU).
    r, runs = Runner(root, ("--embed-batch", str(batch), "--backend", "torch")), {}
    runs["probe"] = r.worker("probe", {})
    files = write_corpus(root / "corpus", a.docs)
    c = cfg.make_config(root=str(root), docs="corpus")
    texts = chunk_texts(c)
    (root / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    model = models.location(c)
    dim = json.loads((Path(model) / "config.json").read_text())["hidden_size"]
    floor = {"model": model, "pooling": models.pooling(c), "batch": batch, "texts": str(root / "texts.json"),
             "max_length": models.effective_max_length(c), "device": "cpu", "fp16": False}
    runs["corpus"] = {"docs": len(files), "chunks": len(texts), "chars": sum(len(t) for t in texts),
                      "max_length": floor["max_length"], "embed_batch": floor["batch"], "upsert_batch": c.upsert_batch}

    for i in range(a.rounds):  # alternate, so that a burst of load on the machine hits one pass, not one side
        runs[f"floor-{i}"] = r.worker("floor", floor, f"floor-{i}")
        runs[f"cold-off-{i}"] = r.build(f"cold-off-{i}", f"runs/off-{i}", "--embed-cache", "off")
        runs[f"cold-on-{i}"] = r.build(f"cold-on-{i}", f"runs/on-{i}")
        for key in (f"cold-off-{i}", f"cold-on-{i}"):
            assert runs[key]["summary"]["chunks_embedded"] == len(texts), (key, runs[key]["summary"])
    built = f"runs/on-{a.rounds - 1}"

    runs["noop"] = r.build("noop", built)
    runs["noop"]["heavy_imports"] = heavy_imports(r, "noop-importtime", built, "corpus")

    half = len(files) // 2
    for mode, options in (("off", ("--embed-cache", "off")), ("on", ())):
        kill = {**ENV, "CHROMA_RESUME_FAILPOINTS": f"wal.after_append:DOC_COMMITTED@{half}=kill"}
        runs[f"kill-{mode}"] = r.build(f"kill-{mode}", f"runs/kill-{mode}", *options, env=kill, expect_rc=-9)
        if mode == "on":
            runs["kill-on"]["cache_entries"] = cache_entries(root / "runs/kill-on/state")
        runs[f"kill-{mode}-rerun"] = r.build(f"kill-{mode}-rerun", f"runs/kill-{mode}", *options)

    edit = edit_corpus(files, 0.01)
    edited = {f.relative_to(root / "corpus").as_posix() for f in edit.pop("files")}
    runs["edit"] = r.build("edit", built)
    runs["edit"].update(edit, changed_chunks=len(set(chunk_texts(c)) - set(texts)),
                        chunks_of_edited_docs=len(chunk_texts(c, only=edited)))
    shutil.rmtree(root / built / "db")
    runs["rebuild"] = r.build("rebuild", built)

    small = write_corpus(root / "small", a.small_docs, seed=11, sizes=((1.0, 50, 200),))
    small_texts = chunk_texts(cfg.make_config(root=str(root), docs="small"))
    (root / "small-texts.json").write_text(json.dumps(small_texts), encoding="utf-8")
    runs["cache"] = r.worker("cache", {"root": str(root), "state_root": "runs/small/state", "dim": dim,
                                       "texts": str(root / "small-texts.json"), "entries": a.cache_entries})
    runs["small-first"] = r.build("small-first", "runs/small", docs="small")  # every vector from the cache
    runs["small-noop"] = r.build("small-noop", "runs/small", docs="small")
    runs["small-noop"].update(docs=len(small),
                              heavy_imports=heavy_imports(r, "small-importtime", "runs/small", "small"))

    runs["store"] = r.worker("store", {"root": str(root), "db": "store", "n": a.store_chunks, "dim": 32})

    if runs["probe"]["answer"]["cuda"]:
        gpu_batch = a.embed_batch or CUDA_BATCH
        runs["gpu-floor"] = r.worker("floor", {**floor, "device": "cuda", "fp16": True, "batch": gpu_batch},
                                     "gpu-floor")
        runs["gpu-build"] = r.build("gpu-build", "runs/gpu", "--embed-cache", "off", "--device", "cuda",
                                    "--embed-batch", str(gpu_batch))
    return runs


# ---- report ----------------------------------------------------------------------------

def _best(runs: dict, prefix: str) -> dict:
    """The fastest pass of one side: the one least disturbed by other work on the machine."""
    return min((v for k, v in runs.items() if re.fullmatch(rf"{prefix}-\d+", k)), key=lambda v: v["wall_sec"])


def _passes(runs: dict, prefix: str) -> str:
    return "/".join(f"{v['wall_sec']:.1f}" for k, v in runs.items() if re.fullmatch(rf"{prefix}-\d+", k))


def _load(*records: dict) -> str:
    return f"{records[0]['load_before']:.1f}->{records[-1]['load_after']:.1f}"


def figures(runs: dict) -> tuple[list[tuple[str, ...]], dict]:
    """Table rows (figure, value, target, raw, load average before->after) and the ratios by name.
    Wall ratios compare each side's fastest pass, CPU ratios each side's least CPU."""
    fl, off, on = _best(runs, "floor"), _best(runs, "cold-off"), _best(runs, "cold-on")
    cpu = {side: min(v["cpu_sec"] for k, v in runs.items() if re.fullmatch(rf"{side}-\d+", k))
           for side in ("floor", "cold-off", "cold-on")}
    corpus, fa, ca = runs["corpus"], fl["answer"], runs["cache"]["answer"]
    cache_work = corpus["chunks"] * (ca["fill_sec"] + ca["get_sec"]) / ca["entries"]  # at the rates measured below
    ratios = {"build_off_vs_floor": off["wall_sec"] / fl["wall_sec"],
              "build_on_vs_floor": on["wall_sec"] / fl["wall_sec"],
              "build_off_vs_floor_cpu": cpu["cold-off"] / cpu["floor"],
              "build_on_vs_floor_cpu": cpu["cold-on"] / cpu["floor"],
              "cache_overhead": on["wall_sec"] / off["wall_sec"] - 1,
              "cache_overhead_cpu": cpu["cold-on"] / cpu["cold-off"] - 1,
              "cache_work_share": cache_work / off["wall_sec"],
              "rebuild_vs_cold": runs["rebuild"]["wall_sec"] / on["wall_sec"]}
    rows = [
        ("floor: FlagModel.encode, fresh process", f"{fl['wall_sec']:.1f} s", "",
         f"import {fa['import_sec']:.1f} + load {fa['load_sec']:.1f} + encode {fa['encode_sec']:.1f} s; "
         f"CPU {fl['cpu_sec']:.0f} s; {corpus['chunks']} chunks of {corpus['docs']} docs, max_length "
         f"{corpus['max_length']}, batch {corpus['embed_batch']}; passes {_passes(runs, 'floor')}", _load(fl)),
        ("cold build, cache off / floor", f"{ratios['build_off_vs_floor']:.3f}", "<= 1.00",
         f"{off['wall_sec']:.1f} s / {fl['wall_sec']:.1f} s; CPU {cpu['cold-off']:.1f} s / {cpu['floor']:.1f} s = "
         f"{ratios['build_off_vs_floor_cpu']:.3f}; passes {_passes(runs, 'cold-off')}", _load(off)),
        ("cold build, cache on / floor", f"{ratios['build_on_vs_floor']:.3f}", "",
         f"{on['wall_sec']:.1f} s; CPU {cpu['cold-on']:.1f} s = {ratios['build_on_vs_floor_cpu']:.3f}; "
         f"passes {_passes(runs, 'cold-on')}", _load(on)),
        ("cache overhead, (on - off) / off", f"{100 * ratios['cache_overhead']:+.1f} %", "<= 2 %",
         f"CPU {100 * ratios['cache_overhead_cpu']:+.1f} %; the cache's own work, {corpus['chunks']} puts + gets at "
         f"the rates of the lookup row: {cache_work:.3f} s = {100 * ratios['cache_work_share']:.2f} %", _load(off, on)),
        ("peak RSS, cold build off / on", f"{off['peak_rss_mb']:.0f} / {on['peak_rss_mb']:.0f} MB", "",
         f"floor {fl['peak_rss_mb']:.0f} MB", _load(off, on)),
    ]
    for key, label, target in (("noop", f"no-op rerun, {corpus['docs']} docs", ""),
                               ("small-noop", f"no-op rerun, {runs['small-noop']['docs']:,} small docs", "<= 2 s")):
        n = runs[key]
        rows.append((label, f"{n['wall_sec']:.2f} s", target,
                     f"embedded {n['summary']['chunks_embedded']}; imported {', '.join(n['heavy_imports']) or 'no '}"
                     f"{'/'.join(HEAVY_MODULES)}", _load(n)))
    sf = runs["small-first"]
    rows.append(("  first build of those, all from cache", f"{sf['wall_sec']:.1f} s", "", f"embedded "
                 f"{sf['summary']['chunks_embedded']}, from cache {sf['summary']['chunks_from_cache']}", _load(sf)))
    e = runs["edit"]
    rows.append((f"{e['edited']} doc(s) edited + 1 appended", f"embedded {e['summary']['chunks_embedded']}",
                 f"= changed ({e['changed_chunks']})",
                 f"from cache {e['summary']['chunks_from_cache']} of {e['chunks_of_edited_docs']} chunks in those docs; "
                 f"{e['wall_sec']:.1f} s", _load(e)))
    rb = runs["rebuild"]
    rows.append(("rebuild, Chroma folder deleted / cold", f"{ratios['rebuild_vs_cold']:.3f}", "<= 0.10, 0 embedded",
                 f"{rb['wall_sec']:.1f} s / {on['wall_sec']:.1f} s; embedded {rb['summary']['chunks_embedded']}, "
                 f"from cache {rb['summary']['chunks_from_cache']}", _load(rb)))
    for mode in ("off", "on"):
        k, rr = runs[f"kill-{mode}"], runs[f"kill-{mode}-rerun"]
        s, held = rr["summary"], rr["stage"]["chunks_upserted_total_last"]
        ratios[f"kill_{mode}_rerun_embedded"] = s["chunks_embedded"]
        if mode == "off":
            value, cached = f"embedded {s['chunks_embedded']}", ""
            target = f"<= not committed ({s['expected_chunks'] - held})"
        else:  # what the killed run had finished is in the cache; the rest was never computed
            again = s["chunks_embedded"] - (s["expected_chunks"] - k["cache_entries"])
            ratios["kill_on_rerun_reembedded"] = again
            value, target = f"re-embedded {again}", "0"
            cached = (f"; cache held {k['cache_entries']} at the kill, so "
                      f"{s['expected_chunks'] - k['cache_entries']} never computed")
        rows.append((f"rerun after kill at 50 %, cache {mode}", value, target,
                     f"embedded {s['chunks_embedded']}, from cache {s['chunks_from_cache']}; Chroma held {held} of "
                     f"{s['expected_chunks']} ({rr['stage']['done_docs']} docs committed){cached}; killed at "
                     f"{k['wall_sec']:.0f} s, rerun {rr['wall_sec']:.1f} s", _load(k, rr)))
    st = runs["store"]["answer"]
    ratios["cache_lookups_per_sec"] = ca["lookups_per_sec"]
    rows += [
        ("cache lookups, get_many", f"{ca['lookups_per_sec']:,.0f} chunks/s", ">= 20,000",
         f"{ca['entries']:,} entries, groups of {ca['group']}; {ca['get_sec']:.2f} s (fill {ca['fill_sec']:.1f} s)",
         _load(runs["cache"])),
        (f"final reconcile: Store.all_ids, {st['n']:,} chunks", f"{st['all_ids_sec']:.2f} s", "small",
         f"insert {st['insert_sec']:.0f} s", _load(runs["store"])),
        (f"durable finish, {st['n']:,} chunks", f"{st['durable_sec']:.2f} s", "",
         f"{st['durable_by']}: {st['files']} files, {st['mb']:.0f} MB; again {st['durable_again_sec']:.2f} s",
         _load(runs["store"])),
    ]
    if "gpu-build" in runs:
        g, gf = runs["gpu-build"], runs["gpu-floor"]
        ratios["gpu_build_vs_floor"] = g["wall_sec"] / gf["wall_sec"]
        rows.append((f"GPU ({runs['probe']['answer']['gpu']}) cold build / floor fp16",
                     f"{ratios['gpu_build_vs_floor']:.3f}", "<= 1.00", f"{g['wall_sec']:.1f} s / {gf['wall_sec']:.1f} s", _load(gf, g)))
    else:
        rows.append(("GPU build / floor", "skipped", "", "torch.cuda.is_available() is False", ""))
    return rows, ratios


def render(rows: list[tuple[str, ...]]) -> str:
    rows = [("figure", "value", "target", "load", "raw"), *[(f, v, t, ld, raw) for f, v, t, raw, ld in rows]]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " | " + row[4] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def pin_source(root: Path, rev: str | None) -> str:
    """The code measured: `git archive REV src` put first on every process's path (other developers
    edit the working tree while a benchmark runs), or the working tree, marked when src/ is dirty."""
    git = ["git", "-C", str(REPO)]
    commit = subprocess.run([*git, "rev-parse", "--short", rev or "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    if rev is None:
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
        return commit + (" + uncommitted src/ changes" if dirty else "")
    archive = subprocess.run([*git, "archive", commit, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    ENV["PYTHONPATH"] = str(root / "src")
    sys.path.insert(0, ENV["PYTHONPATH"])
    return commit


def machine(probe: dict) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cores": os.cpu_count(), "cpu": cpu, "torch": probe["torch"], "torch_threads": probe["threads"],
            "cuda": probe["cuda"], "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    ap.add_argument("--docs", type=int, help="documents of the main corpus (default 100; quick 24)")
    ap.add_argument("--embed-batch", type=int, help=f"texts per forward pass, floor and builds alike (default "
                    f"{CPU_BATCH}; the GPU rows {CUDA_BATCH})")
    ap.add_argument("--rounds", type=int, help="alternating floor / cold-build passes (default 2; quick 1)")
    ap.add_argument("--small-docs", type=int, help="small documents of the no-op run (default 10000; quick 2000)")
    ap.add_argument("--cache-entries", type=int, help="entries of the cache lookup figure (default 25000; quick 5000)")
    ap.add_argument("--store-chunks", type=int,
                    help="chunks of the all_ids / fsync figures (default 100000; quick 20000)")
    ap.add_argument("--json", metavar="FILE", help="also write every figure and every process record as JSON")
    ap.add_argument("--commit", metavar="REV", help="measure this commit's src/ (default: the working tree)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (corpora, logs of every process)")
    a = ap.parse_args(argv)
    for name, full, quick in (("docs", 100, 24), ("rounds", 2, 1), ("small_docs", 10000, 2000),
                              ("cache_entries", 25000, 5000), ("store_chunks", 100000, 20000)):
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)

    started, when = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S %z")
    commit, runs = in_work_folder("bench-chroma-resume-", a, measure)
    rows, ratios = figures(runs)
    m = {**machine(runs["probe"]["answer"]), "commit": commit}
    total = time.perf_counter() - started
    print(f"{when} · commit {m['commit']} · {m['cores']} cores ({m['cpu']}), torch {m['torch']} threads "
          f"{m['torch_threads']}, Python {m['python']} · total {total:.0f} s · bench process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print(render(rows))
    if a.json:
        write_json(a.json, rows, runs, when=when, machine=m, options=vars(a), total_sec=total, ratios=ratios)
    return 0


def in_work_folder(prefix: str, a: argparse.Namespace, measure) -> tuple[str, dict]:
    """(commit measured, measure(root, a)) in a fresh temporary folder, removed unless --keep."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        commit = pin_source(root, a.commit)
        return commit, measure(root, a)
    finally:
        if a.keep:
            print(f"[bench] work folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def write_json(target: str, rows: list[tuple[str, ...]], runs: dict, **head) -> None:
    """Every figure and every process record (less its stdout) as one JSON file."""
    for record in runs.values():
        if isinstance(record, dict):
            record.pop("stdout", None)
    Path(target).write_text(json.dumps({
        **head, "figures": [dict(zip(("figure", "value", "target", "raw", "load"), row)) for row in rows],
        "runs": runs}, indent=2) + "\n", encoding="utf-8")


def entry(workers: dict, bench) -> int:
    """`FILE worker NAME JSON` answers one worker in this fresh process; anything else runs the bench."""
    if sys.argv[1:2] == ["worker"]:
        print("@@" + json.dumps(workers[sys.argv[2]](json.loads(sys.argv[3]))))
        return 0
    return bench()


if __name__ == "__main__":
    sys.exit(entry(WORKERS, main))
