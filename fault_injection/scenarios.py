"""The situations a crash can meet: what state a build starts from, how it is run, how it dies.

A scenario prepares a starting folder once (corpus, and for incremental scenarios an
index already built from an older corpus); every row copies it, so rows never share
files and can run in parallel.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

COLLECTION = "matrix"
HASH_MODEL = ("--embed-model", "hash:32")
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud harbor "
         "lantern meadow orbit signal vector index chunk ember quartz willow falcon").split()


@dataclass(frozen=True)
class Scenario:
    name: str
    why: str
    kind: str = "kill"  # kill | sigterm | writer | random
    start: str = "cold"  # cold | mix (built index, then adds/edits/deletes) | schema (index of another chunk size)
    build_args: tuple[str, ...] = ()
    damage: tuple[str, ...] = ("none",)  # applied after each kill, rotated over the rows
    mutate: str | None = None  # edit | delete: done to a committed document between crash and resume
    docs: int = 32
    model: tuple[str, ...] = HASH_MODEL  # () = the packaged default model
    points: tuple[str, ...] = ()  # boundary name prefixes to sample from (empty: all)
    default_rows: int | None = None  # at most this many rows (slow kinds) unless --points all
    kills: int = 4  # random kind: SIGKILLs in a row before the run to completion
    verify_passes: bool = True  # does `verify` pass on a clean build (rows must agree with the golden)

    @property
    def real_model(self) -> bool:
        return not self.model


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("cold", "first build into an empty collection", damage=("none", "torn")),
    Scenario("mix", "incremental: adds, edits growing and shrinking chunk counts, deletes", start="mix",
             damage=("none", "torn")),
    Scenario("edit-after-crash", "a committed document is edited before the resume", mutate="edit"),
    Scenario("delete-after-crash", "a committed document is deleted before the resume", mutate="delete"),
    Scenario("schema-reset", "chunk size changed: the old index is reset and rebuilt", start="schema",
             build_args=("--schema-change", "reset")),
    Scenario("sync-delete-stale", "re-embed everything, delete stale", start="mix",
             build_args=("--sync-mode", "delete-stale")),
    # Upsert only: stale generations stay in the collection, and verify (which expects exactly
    # the manifest's ids) reports them as orphans even after a clean build.
    Scenario("sync-none", "upsert only: old generations stay", start="mix", build_args=("--sync-mode", "none"),
             verify_passes=False),
    Scenario("fsync-off", "WAL never fsynced but RUN_*: power loss drops its tail", start="mix",
             build_args=("--wal-fsync", "off"), damage=("powerloss",)),
    Scenario("fsync-doc", "WAL fsynced per commit group: power loss drops the open group",
             build_args=("--wal-fsync", "doc"), damage=("powerloss",)),
    Scenario("fsync-interval", "WAL fsynced every 7 events: power loss drops up to 6",
             build_args=("--wal-fsync", "interval", "--wal-fsync-interval", "7"), damage=("powerloss",)),
    Scenario("sigterm", "SIGTERM mid-batch: graceful stop (exit 130), then resume", kind="sigterm",
             points=("store.after_upsert",), default_rows=3),
    Scenario("second-writer", "a second build while the first holds the lock, then the holder is killed",
             kind="writer", points=("lock.acquired", "wal.after_append:DOC_COMMITTED"), default_rows=2),
    Scenario("random-kills", "SIGKILLs at random moments of a 200-document build", kind="random", docs=200),
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


def engine_args(s: Scenario, *extra: str) -> list[str]:
    """The engine options of this scenario, relative to the row's folder (shared by build and verify)."""
    return ["--docs", "corpus", "--collection", COLLECTION, "--upsert-batch", "16", "--progress", "off",
            "--db", "db", "--state-root", "state", *s.model, *s.build_args, *extra]


def build_command(s: Scenario, *extra: str) -> list[str]:
    """The engine's CLI as a user types it; every run logs what it embeds to embed.log."""
    return [sys.executable, "-m", "chroma_resume", "build", *engine_args(s, "--embed-log", "embed.log", *extra)]


def engine_config(folder: Path, s: Scenario):
    """The engine's own Config for this scenario in `folder`, resolved as its CLI does."""
    from chroma_resume import cli

    args = cli.parser().parse_args(["build", *engine_args(s)])
    options = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name, _, _ in cli.OPTIONS}
    return cli.resolve_config({**options, "root": str(folder)}, folder=str(folder))


def engine_paths(folder: Path, s: Scenario) -> dict[str, str]:
    """state_dir, manifest and wal of this scenario in `folder`."""
    from chroma_resume import state

    return state.paths(engine_config(folder, s))


def engine_env(failpoints: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    env["HF_HUB_OFFLINE"] = "1"
    if failpoints:
        env["CHROMA_RESUME_FAILPOINTS"] = failpoints
    return env


def prepare(s: Scenario, folder: Path, seed: int) -> None:
    """The scenario's starting state: the corpus, and an older index where it needs one."""
    corpus = folder / "corpus"
    write_corpus(corpus, s.docs, seed)
    if s.start == "cold":
        return
    old_schema = ("--chunk-chars", "600", "--overlap-chars", "100") if s.start == "schema" else ()
    subprocess.run(build_command(s, *old_schema), cwd=folder, env=engine_env(), check=True,
                   capture_output=True, timeout=600)
    (folder / "embed.log").unlink()  # the embeddings counted are those of the runs under test
    if s.start == "mix":
        _mix(corpus, s.docs, seed)


def _mix(corpus: Path, n: int, seed: int) -> None:
    """Adds, deletes, edits that grow a document, shrink it, or keep its size."""
    rng = random.Random(seed + 1)
    docs = sorted(corpus.iterdir())
    write_corpus(corpus, 4, seed + 2, first=n)
    for path in docs[1:4]:  # grow
        path.write_text(path.read_text(encoding="utf-8") + _text(rng, 500), encoding="utf-8")
    for path in docs[-10:-7]:  # shrink
        path.write_text(_text(rng, 25), encoding="utf-8")
    docs[n // 2].write_text(_text(rng, len(docs[n // 2].read_text().split())), encoding="utf-8")  # same size
    for path in docs[-4:-1]:  # delete
        path.unlink()


def mutate(s: Scenario, folder: Path) -> str:
    """Between crash and resume: edit or delete the first document (the first one committed)."""
    target = sorted((folder / "corpus").iterdir())[0]
    if s.mutate == "edit":
        target.write_text(target.read_text(encoding="utf-8") + "Edited after the crash. " * 40, encoding="utf-8")
    elif s.mutate == "delete":
        target.unlink()
    return f"corpus/{target.name}"
