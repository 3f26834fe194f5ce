"""The situations a crash can meet: what state a build starts from, how it is run, how it dies,
and what changes between the crash and the resume.

A scenario prepares a starting folder once (corpus, and for incremental scenarios an
index already built from an older corpus); every row copies it, so rows never share
files and can run in parallel. The runs after the first kill use the scenario's final
options (`build_args` then `resume_args`, last wins); its golden is a clean build of the
final corpus with those final options from the same starting state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

COLLECTION = "matrix"
HASH_MODEL = ("--embed-model", "hash:32")
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud harbor "
         "lantern meadow orbit signal vector index chunk ember quartz willow falcon").split()
ATTIC = "attic"  # beside the corpus: the text each mixed document had in the starting index
MIX_RECORD = "mix.json"  # which documents the mix grew, shrank, rewrote, removed, added or left alone
UNITS = "units.jsonl"  # the corpus of the `units` start (a units JSONL: metadata, doc_ids)
UNITS_START = "units.start.jsonl"  # in the attic: the units the starting index was built from
MOVED_DB = "db-moved"  # where the move-db-then-revert change moves the row's --db folder
TINY_MODEL = ("--embed-model", "tiny-model", "--pooling", "mean")  # a random BERT folder (tinymodel.py)
HARNESS_ROOT = str(Path(__file__).resolve().parent.parent)  # so builds can run `-m fault_injection.engine`
# A model's rows run float32: a row is compared with its golden at float noise (compare.VECTOR_ATOL),
# and --backend auto's bf16 is taken by a timed probe check recorded per state root, so the golden and
# a row may choose differently on a machine where bf16 is about as fast as float32 (a CI run did).
# Moving an index between precisions is proven by tests/test_precision.py.
FLOAT32 = ("--fp16", "off")
FSYNC_OFF = ("--wal-fsync", "off")
FSYNC_INTERVAL = ("--wal-fsync", "interval", "--wal-fsync-interval", "7")


@dataclass(frozen=True)
class Scenario:
    name: str
    why: str
    kind: str = "kill"  # kill | sigterm | writer | random
    start: str = "cold"  # cold | mix (built index, then adds/edits/deletes) | schema (index of another chunk size)
    #                      | units (units JSONL index, then metadata flips, an edit, a re-key, an add, a remove)
    #                      | units-cut (units, whose run committed everything and died before its manifest; then
    #                        a flip undone, a run that died half way through rewriting it, the flip redone)
    build_args: tuple[str, ...] = ()
    resume_args: tuple[str, ...] = ()  # options changed between the first kill and the resume
    damage: tuple[str, ...] = ("none",)  # applied after each kill, rotated over the rows
    change: str | None = None  # a changes.CHANGES name: done between the first kill and the resume
    expect_warns: tuple[str, ...] = ()  # functional WARNs the resume must print (tampering, not a crash)
    docs: int = 32
    model: tuple[str, ...] = HASH_MODEL  # () = the packaged default model
    points: tuple[str, ...] = ()  # boundary name prefixes to sample from (empty: all)
    default_rows: int | None = None  # at most this many rows unless --points all (None: matrix.DEFAULT_POINTS)
    kills: int = 4  # random kind: SIGKILLs in a row before the run to completion
    verify_passes: bool = True  # does `verify` pass on a clean build (rows must agree with the golden)

    @property
    def real_model(self) -> bool:
        return not self.model

    @property
    def changes_options(self) -> bool:
        return bool(self.resume_args)

    def option(self, name: str, final: bool) -> str | None:
        """The value of `--name` in the first run's (or the final) options, None if not given."""
        args = [*self.build_args, *(self.resume_args if final else ())]
        values = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == name]
        return values[-1] if values else None

    @property
    def start_key(self) -> tuple:
        """Scenarios with equal keys start from the same state (its index built with the
        scenario's model and default options)."""
        return self.start, self.docs, self.model

    @property
    def trace_key(self) -> tuple:
        """Scenarios with equal keys have the same clean first run."""
        return (*self.start_key, self.build_args)

    @property
    def stale_may_differ(self) -> bool:
        """Switching to `--sync-mode none` after the crash: the stale generations the first run
        (which deleted) already removed cannot come back, the others may stay: both are right."""
        return (self.option("--sync-mode", False) or "incremental") != "none" \
            and self.option("--sync-mode", True) == "none"


def _after_crash(base: str, why: str, **fields) -> list[Scenario]:
    """A crash + change scenario, and the same under power loss with the WAL fsynced never
    (`off`: only RUN_* and the barriers before deletes) or every 7 events (`interval`)."""
    plain = Scenario(base, why, start="mix", **fields)
    lossy = [Scenario(f"{base}+fsync-{policy}", f"{why}; power loss, --wal-fsync {policy}", start="mix",
                      build_args=args, damage=("powerloss", "hole"), default_rows=2, **fields)
             for policy, args in (("off", FSYNC_OFF), ("interval", FSYNC_INTERVAL))]
    return [plain, *lossy]


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("cold", "first build into an empty collection", damage=("none", "torn")),
    Scenario("mix", "incremental: adds, edits growing and shrinking chunk counts, deletes", start="mix",
             damage=("none", "torn")),
    Scenario("edit-after-crash", "a committed document is edited before the resume", change="edit"),
    Scenario("delete-after-crash", "a committed document is deleted before the resume", change="delete"),
    Scenario("schema-reset", "chunk size changed: the old index is reset and rebuilt", start="schema",
             build_args=("--schema-change", "reset")),
    Scenario("sync-delete-stale", "re-embed everything, delete stale", start="mix",
             build_args=("--sync-mode", "delete-stale")),
    # Upsert only: stale generations stay in the collection, and verify (which expects exactly
    # the manifest's ids) reports them as orphans even after a clean build.
    Scenario("sync-none", "upsert only: old generations stay", start="mix", build_args=("--sync-mode", "none"),
             verify_passes=False),
    # powercut: Chroma's segment files emptied too: the rerun sets the store aside, rebuilds from the cache.
    Scenario("fsync-off", "WAL never fsynced but RUN_* and barriers: power loss drops its tail", start="mix",
             build_args=FSYNC_OFF, damage=("powerloss", "powercut")),
    Scenario("fsync-doc", "WAL fsynced per commit group: power loss drops the open group",
             build_args=("--wal-fsync", "doc"), damage=("powerloss", "powercut")),
    Scenario("fsync-interval", "WAL fsynced every 7 events: power loss drops up to 6",
             build_args=FSYNC_INTERVAL, damage=("powerloss", "powercut")),
    *_after_crash("undo-after-crash", "an edit whose old generation was deleted is undone before the resume",
                  change="undo"),
    *_after_crash("restore-after-crash", "a removed document, its chunks deleted, is restored before the resume",
                  change="restore"),
    *_after_crash("to-delete-stale", "--sync-mode incremental -> delete-stale between crash and resume",
                  resume_args=("--sync-mode", "delete-stale")),
    *_after_crash("to-sync-none", "--sync-mode incremental -> none between crash and resume",
                  resume_args=("--sync-mode", "none"), verify_passes=False),
    *_after_crash("chunking-change", "--chunk-chars 1200 -> 800 between crash and resume",
                  resume_args=("--chunk-chars", "800")),
    *_after_crash("model-change", "--embed-model hash:32 -> hash:48 between crash and resume",
                  resume_args=("--embed-model", "hash:48")),
    *_after_crash("space-change", "--hnsw-space cosine -> l2 between crash and resume",
                  resume_args=("--hnsw-space", "l2")),
    # A cut after Chroma re-wrote its index files (every `sync_threshold` = 1,000 records: a refresh
    # of ~1,200 chunks crosses it): they revert to the starting index's fsynced copy while
    # chroma.sqlite3 moved on. Every file reads; only the deep check after the unclean end sees
    # rows without vectors; the store is set aside and rebuilt from the embedding cache.
    Scenario("stale-index", "power cut reverts Chroma's index files behind chroma.sqlite3 during a refresh",
             start="mix", docs=600, build_args=("--sync-mode", "delete-stale", "--upsert-batch", "256"),
             damage=("stalehnsw",),
             points=("build.reconcile", "wal.after_append:RUN_FINISH", "manifest.before_replace"), default_rows=2),
    Scenario("unreadable-after-crash", "unchanged documents become a FIFO and a broken symlink before the "
             "resume: skipped, not deleted", start="mix", change="unreadable", default_rows=3),
    Scenario("tamper-after-crash", "behind the tool's back one chunk is deleted and a foreign id of the same "
             "document added: equal counts, so only an id-set reconcile repairs it", start="mix",
             change="tamper", expect_warns=("missing_after_build", "orphans_deleted"), default_rows=2),
    Scenario("sigterm", "SIGTERM mid-batch: graceful stop (exit 130), then resume", kind="sigterm",
             points=("store.after_upsert",), default_rows=3),
    Scenario("second-writer", "a second build while the first holds the lock, then the holder is killed",
             kind="writer", points=("lock.acquired", "wal.after_append:DOC_COMMITTED"), default_rows=2),
    Scenario("random-kills", "SIGKILLs at random moments of a 200-document build", kind="random", docs=200),
    # DESIGN §13: no exit 0 over a wrong index when a record is missing, moved or out of date.
    Scenario("meta-revert-after-crash", "units: metadata flips (same ids) cut by a crash, then reverted before "
             "the resume", start="units", docs=12, build_args=("--upsert-batch", "2"), change="revert",
             default_rows=3),
    Scenario("write-state-false-then-revert", "a crashed --write-state false run is finished (no manifest, WAL "
             "cleared), then its flips reverted: only the collection's mark says what changed", start="units",
             docs=12, build_args=("--write-state", "false"), resume_args=("--write-state", "true"),
             change="finish-then-revert", default_rows=2),
    Scenario("wal-off-then-revert", "--wal off killed mid-run (no record but the mark), flips reverted, resumed "
             "with the WAL on", start="units", docs=12, build_args=("--wal", "off", "--upsert-batch", "2"),
             resume_args=("--wal", "on"), change="revert", points=("store.", "build.reconcile"), default_rows=2),
    Scenario("moved-db-then-revert", "the --db folder is moved between crash and resume, and the flips reverted",
             start="units", docs=12, resume_args=("--db", MOVED_DB), change="move-db-then-revert",
             default_rows=2),
    Scenario("meta-tamper-after-crash", "units: a committed document's stored metadata is changed behind the "
             "tool's back before the resume: the resume check must read content, not ids", start="units",
             docs=12, change="tamper-meta", expect_warns=("wal_ahead_of_db",), default_rows=2,
             points=("wal.after_append:DOC_COMMITTED", "store.after_upsert")),
    Scenario("rewrite-cut-then-redone", "units: a run committed a flip and died before its manifest; the flip "
             "undone, a rewrite cut half way, the flip redone: the WAL's commit is demoted", start="units-cut",
             docs=12, default_rows=2),
    Scenario("model-swap-after-crash", "the model folder's weights change behind the same path between crash "
             "and resume: a schema change", docs=8, model=TINY_MODEL, change="swap-model", default_rows=1,
             points=("wal.after_append:DOC_COMMITTED", "store.after_upsert")),
    # Each build starts its own local Ray (--ray-address local): ~5 s a run, so few rows.
    Scenario("ray-executor", "the model in 2 Ray actors; the killed writer takes its actors with it",
             build_args=("--executor", "ray", "--ray-address", "local", "--ray-workers", "2",
                         "--ray-cpus-per-worker", "0.5"), default_rows=3,
             points=("wal.after_append:DOC_COMMITTED", "store.after_upsert", "wal.append:UPSERT")),
    Scenario("real-model", "the packaged MiniLM model instead of the stand-in", docs=10, model=(),
             points=("wal.after_append:DOC_COMMITTED", "store.after_upsert", "wal.append:UPSERT")),
)}


def write_corpus(folder: Path, n: int, seed: int, first: int = 0) -> None:
    """n documents of mixed sizes: most fit one chunk, some span two to six."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        (folder / f"doc{i:04d}.md").write_text(_text(rng, rng.choice((30, 60, 120, 300, 900))), encoding="utf-8")


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words)) + "\n"


def engine_args(s: Scenario, *extra: str, final: bool = False) -> list[str]:
    """The engine options of this scenario, relative to the row's folder (shared by build and
    verify): those of the first run, or with `final` those of every run after the first kill."""
    source = ("--units", UNITS) if s.start.startswith("units") else ("--docs", "corpus")
    return [*source, "--collection", COLLECTION, "--upsert-batch", "16", "--progress", "off",
            "--db", "db", "--state-root", "state", *s.model, *(() if s.model == HASH_MODEL else FLOAT32),
            *s.build_args, *(s.resume_args if final else ()),
            *extra]


def build_command(s: Scenario, *extra: str, final: bool = False) -> list[str]:
    """The engine's CLI as a user types it, through the harness's fsync observer (engine.py);
    every run logs what it embeds to embed.log."""
    return [sys.executable, "-m", "fault_injection.engine", "build",
            *engine_args(s, "--embed-log", "embed.log", *extra, final=final)]


def engine_config(folder: Path, s: Scenario, final: bool = True):
    """The engine's own Config for this scenario in `folder`, resolved as its CLI does."""
    from chroma_resume import cli

    args = cli.parser().parse_args(["build", *engine_args(s, final=final)])
    options = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in cli.OPTIONS}
    return cli.resolve_config({**options, "root": str(folder)}, folder=str(folder))


def engine_paths(folder: Path, s: Scenario, final: bool = True) -> dict[str, str]:
    """state_dir, manifest and wal of this scenario in `folder` (under its first or final options)."""
    from chroma_resume import state

    return state.paths(engine_config(folder, s, final))


def engine_env(failpoints: str = "", sync_log: Path | None = None) -> dict[str, str]:
    """The environment of a build: the pinned engine (if any) and the harness importable,
    failpoints and the fsync log only when given."""
    from .engine import ENGINE_ENV, SYNC_LOG_ENV

    env = {k: v for k, v in os.environ.items() if k not in ("CHROMA_RESUME_FAILPOINTS", SYNC_LOG_ENV)}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get(ENGINE_ENV), HARNESS_ROOT, env.get("PYTHONPATH")]))
    if failpoints:
        env["CHROMA_RESUME_FAILPOINTS"] = failpoints
    if sync_log:
        env[SYNC_LOG_ENV] = str(sync_log)
    return env


def prepare(s: Scenario, folder: Path, seed: int) -> None:
    """The scenario's starting state: the corpus, and an older index where it needs one."""
    folder.mkdir(parents=True, exist_ok=True)
    if s.model == TINY_MODEL:
        from . import tinymodel

        tinymodel.make(folder / "tiny-model", seed)
    if s.start.startswith("units"):
        write_units(folder / UNITS, _units(s.docs, seed))
    else:
        write_corpus(folder / "corpus", s.docs, seed)
    if s.start == "cold":
        return
    old_schema = ("--chunk-chars", "600", "--overlap-chars", "100") if s.start == "schema" else ()
    plain = dataclasses.replace(s, build_args=(), resume_args=())  # the start depends on start_key alone
    subprocess.run(build_command(plain, *old_schema), cwd=folder, env=engine_env(), check=True,
                   capture_output=True, timeout=600)
    (folder / "embed.log").unlink()  # the embeddings counted are those of the runs under test
    if s.start == "mix":
        _mix(folder, s.docs, seed)
    if s.start.startswith("units"):
        _units_mix(folder, s.docs, seed)
    if s.start == "units-cut":
        _cut_rewrite(folder, plain)


def _mix(folder: Path, n: int, seed: int) -> None:
    """Adds, deletes, edits that grow a document, shrink it, or keep its size. The indexed text
    of every touched document is kept in the attic and the kinds in mix.json, for the changes."""
    corpus, attic = folder / "corpus", folder / ATTIC
    rng = random.Random(seed + 1)
    docs = sorted(corpus.iterdir())
    write_corpus(corpus, 4, seed + 2, first=n)
    kinds = {"grown": docs[1:4], "shrunk": docs[-10:-7], "same-size": [docs[n // 2]], "removed": docs[-4:-1]}
    touched = [p for paths in kinds.values() for p in paths]
    attic.mkdir()
    for path in touched:
        shutil.copy2(path, attic / path.name)
    for path in kinds["grown"]:
        path.write_text(path.read_text(encoding="utf-8") + _text(rng, 500), encoding="utf-8")
    for path in kinds["shrunk"]:
        path.write_text(_text(rng, 25), encoding="utf-8")
    for path in kinds["same-size"]:
        path.write_text(_text(rng, len(path.read_text().split())), encoding="utf-8")
    for path in kinds["removed"]:
        path.unlink()
    record = {kind: [p.name for p in paths] for kind, paths in kinds.items()}
    record["added"] = [f"doc{i:04d}.md" for i in range(n, n + 4)]
    record["unchanged"] = [p.name for p in docs if p not in touched]
    (folder / MIX_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")


def mixed(folder: Path, kind: str) -> list[str]:
    """The uris of one kind of the mix (grown, shrunk, same-size, removed, added, unchanged)."""
    return json.loads((folder / MIX_RECORD).read_text(encoding="utf-8"))[kind]


def write_units(path: Path, units: list[dict]) -> None:
    path.write_text("".join(json.dumps(u, sort_keys=True) + "\n" for u in units), encoding="utf-8")


def read_units(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _units(n: int, seed: int, first: int = 0) -> list[dict]:
    """n units of one to five chunks, with metadata of several types."""
    rng = random.Random(seed)
    return [{"source_uri": f"u{i:03d}", "text": _text(rng, rng.choice((60, 300, 600, 900))),
             "metadata": {"lang": "en", "rank": i, "draft": False}} for i in range(first, first + n)]


def _units_mix(folder: Path, n: int, seed: int) -> None:
    """Metadata flips (same text, same ids) of documents of several chunks, a text edit, a
    doc_id re-key, an add and a remove; the starting units are kept in the attic."""
    attic = folder / ATTIC
    attic.mkdir()
    shutil.copy2(folder / UNITS, attic / UNITS_START)
    units = read_units(folder / UNITS)
    multi = [u["source_uri"] for u in units if len(u["text"]) > 2000]
    kinds = {"flipped": multi[:3], "edited": [units[-3]["source_uri"]], "rekeyed": [units[-2]["source_uri"]],
             "removed": [units[-1]["source_uri"]]}
    rng = random.Random(seed + 1)
    for u in units:
        if u["source_uri"] in kinds["flipped"]:
            u["metadata"] = {**u["metadata"], "lang": "fr", "draft": True}
        elif u["source_uri"] in kinds["edited"]:
            u["text"] += _text(rng, 200)
        elif u["source_uri"] in kinds["rekeyed"]:
            u["doc_id"] = f"{u['source_uri']}-v2"
    added = _units(1, seed + 2, first=n)
    write_units(folder / UNITS, [u for u in units if u["source_uri"] not in kinds["removed"]] + added)
    record = {**kinds, "added": [u["source_uri"] for u in added]}
    (folder / MIX_RECORD).write_text(json.dumps(record, indent=1), encoding="utf-8")


def _cut_rewrite(folder: Path, plain: Scenario) -> None:
    """DESIGN §13 "resumed means checked by content": the mix is committed by a run that dies before
    its manifest; the first flip is undone and a run dies after rewriting half of that document's
    rows (same ids); the flip is redone. The WAL calls the flipped generation committed, then begun
    again; half its rows hold the undone metadata."""
    def die_at(spec: str, *extra: str) -> None:
        done = subprocess.run(build_command(plain, *extra), cwd=folder, env=engine_env(spec), capture_output=True,
                              timeout=600)
        if done.returncode != -9:
            raise RuntimeError(f"units-cut start: the run meant to die at {spec} exited {done.returncode}: "
                               f"{done.stderr.decode(errors='replace')[-500:]}")

    die_at("build.reconcile=kill")
    mixed_units = read_units(folder / UNITS)
    target = mixed(folder, "flipped")[0]
    start = {u["source_uri"]: u for u in read_units(folder / ATTIC / UNITS_START)}
    write_units(folder / UNITS, [start[target] if u["source_uri"] == target else u for u in mixed_units])
    die_at("store.after_upsert@1=kill", "--upsert-batch", "2")
    write_units(folder / UNITS, mixed_units)
    (folder / "embed.log").unlink(missing_ok=True)
