"""Randomized sequences of crashes, edits and option changes, each ending compared with a clean build.

`python -m fault_injection.sequences --sequences N --seed S [--steps K]`

Where the crash matrix varies one crash and one change, a sequence chains many (DESIGN §13: no
sequence may end with exit 0 over an index that differs from a clean build). Each step changes
the world (a units JSONL corpus: text edits, metadata flips, doc_id re-keys, adds, removes, reverts
to an earlier corpus, a doc_id carried to another source_uri; options: chunking, distance space,
model, sync mode; the --db folder moved; folders backed up, restored (db only, state only, both),
copied and switched to, often right after a kill) and then runs one build in some mode: to completion,
SIGKILLed at a random boundary (a failpoint and hit number drawn at random: a boundary never
reached means the run finished), a torn WAL append, a kill under `--wal-fsync off|interval`
followed by power loss (the WAL cut back to its last observed fsync), SIGTERM, `--write-state
false`, `--wal off` (finished, killed, or stopped by SIGTERM), `--resume off`.
A sequence ends with a normal build of the final corpus and options; its rows (ids, documents,
metadata, vectors, read in a fresh process) must equal a clean build's in a new folder, and
`verify` must pass. The stand-in embedder (`hash:DIM`) keeps a step under a second or two.

Every sequence is drawn from `Random(f"{seed}:{index}")`, so a failure names the seed and index
that replay it alone, and prints its steps.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from chroma_resume.corpus import doc_id_for

from . import walfile
from .engine import SYNC_LOG_ENV
from .scenarios import HARNESS_ROOT, WORDS

COLLECTION = "seq"
UNITS = "units.jsonl"
TIMEOUT = 300.0  # seconds for one build
START_UNITS = 8
KILL_POINTS = ("lock.acquired", "store.after_upsert", "store.after_delete", "build.reconcile",
               "manifest.before_replace", "manifest.after_replace", "wal.after_append:DOC_BEGIN",
               "wal.after_append:UPSERT_BATCH_COMMITTED", "wal.after_append:DOC_COMMITTED",
               "wal.after_append:DELETE_INTENT", "wal.after_append:DELETE_OLD_DONE",
               "wal.after_append:DELETE_STALE_DONE", "wal.after_append:DOC_DONE",
               "wal.before_append:RUN_FINISH")
ONCE_PER_RUN = ("lock.acquired", "build.reconcile", "manifest.before_replace", "manifest.after_replace",
                "wal.before_append:RUN_FINISH")  # a later hit is never reached: always the first
TORN_EVENTS = ("DOC_BEGIN", "UPSERT_BATCH_COMMITTED", "DOC_COMMITTED", "DELETE_OLD_DONE", "DOC_DONE")
# Run modes, with their weights: most steps crash somewhere.
MODES = {"finish": 2, "kill": 5, "torn": 2, "powerloss": 2, "sigterm": 1, "write-state-false": 2, "wal-off": 2,
         "wal-off-kill": 2, "wal-off-sigterm": 1, "resume-off": 1}
FOLDER_STEPS = 0.4  # the share of steps that also copy, back up or restore folders (_shuffle_folders)
OPTIONS = {"--chunk-chars": ("1200", "700"), "--hnsw-space": ("cosine", "l2"), "--embed-model": ("hash:32", "hash:24"),
           "--sync-mode": ("incremental", "delete-stale", "none")}


@dataclass
class World:
    """What the user controls between runs: the corpus, the options, where the database is."""
    units: list[dict]
    options: dict[str, str]
    db: str = "db"
    history: list[list[dict]] = field(default_factory=list)  # earlier corpora, to revert to
    next_id: int = 0
    backups: list[str] = field(default_factory=list)  # folders bk<N>/ holding a copy of db/ and state/
    copies: list[str] = field(default_factory=list)  # --db folders copied from another, to switch between

    def args(self, final: bool = False) -> list[str]:
        opts = dict(self.options)
        if final:
            opts["--sync-mode"] = "incremental"
        return ["--units", UNITS, "--collection", COLLECTION, "--db", self.db, "--state-root", "state",
                "--upsert-batch", "4", "--progress", "off", *[a for kv in opts.items() for a in kv]]


@dataclass
class Outcome:
    seed: int
    index: int
    steps: list[str]
    n_steps: int = 0
    failure: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failure

    def report(self) -> str:
        lines = [f"sequence {self.index} (seed {self.seed}): {'ok' if self.ok else 'FAIL: ' + self.failure}"]
        lines += [f"  {n}. {step}" for n, step in enumerate(self.steps, 1)]
        if not self.ok:
            lines.append(f"  reproduce: python -m fault_injection.sequences --seed {self.seed} --only {self.index} "
                         f"--steps {self.n_steps} --keep")
        return "\n".join(lines)


def _text(rng: random.Random) -> str:
    words = rng.choice((40, 150, 400, 700))
    return " ".join(rng.choice(WORDS) + ("." if rng.random() < 0.1 else "") for _ in range(words)) + "\n"


def _unit(rng: random.Random, n: int) -> dict:
    return {"source_uri": f"u{n:03d}", "text": _text(rng), "metadata": {"lang": "en", "n": n}}


def _mutate(world: World, rng: random.Random) -> list[str]:
    """One to three changes of the corpus, the options or the database's place; what was done."""
    done = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("edit", "edit", "flip", "flip", "rekey", "rename", "add", "remove", "revert", "option",
                           "move-db"))
        units = world.units
        if kind == "revert" and world.history:
            world.units = copy.deepcopy(rng.choice(world.history))
            done.append(f"revert the corpus to an earlier one ({len(world.units)} units)")
            continue
        if kind == "option":
            name = rng.choice(sorted(OPTIONS))
            world.options[name] = rng.choice(OPTIONS[name])
            done.append(f"option {name} {world.options[name]}")
            continue
        if kind == "move-db":
            moved = f"db{len(done)}{rng.randint(0, 999)}"
            done.append(f"move {world.db}/ to {moved}/")
            world.db = moved
            continue
        if kind == "add" or not units:
            units.append(_unit(rng, world.next_id))
            world.next_id += 1
            done.append(f"add {units[-1]['source_uri']}")
            continue
        u = rng.choice(units)
        if kind == "edit":
            u["text"] = _text(rng) if rng.random() < 0.5 else u["text"] + _text(rng)
            done.append(f"edit {u['source_uri']}")
        elif kind in ("flip", "revert"):
            meta = u["metadata"]
            meta["lang"] = "fr" if meta.get("lang") == "en" else "en"
            if rng.random() < 0.3:
                meta["draft"] = not meta.get("draft", False)
            done.append(f"flip {u['source_uri']} metadata to {meta}")
        elif kind == "rekey":
            if "doc_id" in u and rng.random() < 0.5:
                del u["doc_id"]
            else:
                u["doc_id"] = f"{u['source_uri']}-k{rng.randint(0, 3)}"
            done.append(f"re-key {u['source_uri']} to {u.get('doc_id', '(default)')}")
        elif kind == "rename":  # another source_uri carries the same doc_id (and text): the same chunk ids
            old = u["source_uri"]
            u["doc_id"] = u.get("doc_id") or doc_id_for(old)
            u["source_uri"] = f"u{world.next_id:03d}"
            world.next_id += 1
            done.append(f"rename {old} to {u['source_uri']} keeping doc_id {u['doc_id']}")
        elif kind == "remove":
            units.remove(u)
            done.append(f"remove {u['source_uri']}")
    return done


def _shuffle_folders(world: World, rng: random.Random, folder: Path) -> list[str]:
    """What a user does with folders between runs, often right after a kill: back up the --db and
    state folders, restore the db only, the state only, or both, copy the db and go on with the copy,
    or switch back to a folder left behind. A copy or a restored folder must never be vouched for by
    records written for another (each sequence still ends compared with a clean build)."""
    kind = rng.choice(("backup", "backup", "restore-db", "restore-state", "restore-both", "copy", "switch"))
    db, state = folder / world.db, folder / "state"
    if kind == "backup" or (kind.startswith("restore") and not world.backups):
        name = f"bk{len(world.backups)}"
        (folder / name).mkdir()
        if db.exists():
            shutil.copytree(db, folder / name / "db", symlinks=True)
        if state.exists():
            shutil.copytree(state, folder / name / "state", symlinks=True)
        world.backups.append(name)
        return [f"back up {world.db}/ and state/ to {name}/"]
    if kind.startswith("restore"):
        name = rng.choice(world.backups)
        parts = {"restore-db": ("db",), "restore-state": ("state",), "restore-both": ("db", "state")}[kind]
        for part in parts:
            target = db if part == "db" else state
            shutil.rmtree(target, ignore_errors=True)
            if (folder / name / part).exists():
                shutil.copytree(folder / name / part, target, symlinks=True)
        return [f"restore {' and '.join(world.db + '/' if p == 'db' else 'state/' for p in parts)} from {name}/"]
    if kind == "copy" and db.exists():
        copied = f"copy{len(world.copies)}{rng.randint(0, 999)}"
        shutil.copytree(db, folder / copied, symlinks=True)
        world.copies.append(world.db)
        world.db = copied
        return [f"copy {db.name}/ to {copied}/ and go on with the copy"]
    others = [c for c in world.copies if c != world.db and (folder / c).exists()]
    if others:
        back = rng.choice(others)
        world.copies.append(world.db)
        world.db = back
        return [f"switch back to {back}/"]
    return []


def _mode(rng: random.Random) -> tuple[str, list[str], str]:
    """(mode, extra options, failpoint spec) of one run."""
    mode = rng.choices(list(MODES), weights=list(MODES.values()))[0]
    hit = rng.randint(1, 3)
    point = rng.choice(KILL_POINTS)
    kill = f"{point}@{1 if point in ONCE_PER_RUN else hit}=kill"
    return {
        "finish": (mode, [], ""),
        "kill": (mode, [], kill),
        "torn": (mode, [], f"wal.append:{rng.choice(TORN_EVENTS)}@{hit}=torn"),
        "powerloss": (mode, ["--wal-fsync", rng.choice(("off", "interval"))], kill),
        "sigterm": (mode, [], f"store.after_upsert@{hit}=sleep(1500)"),
        "wal-off-sigterm": (mode, ["--wal", "off"], f"store.after_upsert@{hit}=sleep(1500)"),
        "write-state-false": (mode, ["--write-state", "false"], kill if rng.random() < 0.4 else ""),
        "wal-off": (mode, ["--wal", "off"], ""),
        "wal-off-kill": (mode, ["--wal", "off"], rng.choice((f"store.after_upsert@{hit}", f"store.after_delete@{hit}",
                                                            "build.reconcile@1")) + "=kill"),
        "resume-off": (mode, ["--resume", "off"], kill if rng.random() < 0.5 else ""),
    }[mode]


def _env(failpoints: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    env["HF_HUB_OFFLINE"] = "1"
    if failpoints:
        env["CHROMA_RESUME_FAILPOINTS"] = failpoints
    return env


def _cli(folder: Path, args: list[str], failpoints: str = "", sigterm_after: str = "",
         sync_log: Path | None = None) -> subprocess.CompletedProcess:
    """The engine's CLI as a user runs it (through the fsync observer of engine.py when `sync_log`
    is given). With `sigterm_after`, SIGTERM is sent once the failpoint trace shows that boundary
    (the run sleeps there, so the signal lands mid-run)."""
    command = [sys.executable, "-m", "fault_injection.engine" if sync_log else "chroma_resume", *args]
    if not sigterm_after:
        env = _env(failpoints) | ({SYNC_LOG_ENV: str(sync_log), "PYTHONPATH": _harness_path()} if sync_log else {})
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    trace = folder / "trace.log"
    trace.unlink(missing_ok=True)
    proc = subprocess.Popen(command, cwd=folder, env=_env(f"{failpoints};trace={trace}"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    point, hit = sigterm_after.split("@")
    while proc.poll() is None and time.monotonic() < deadline:
        seen = trace.read_text().splitlines() if trace.exists() else []
        if sum(line.rstrip(":") == point for line in seen) >= int(hit):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    out, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _harness_path() -> str:
    return os.pathsep.join(filter(None, [HARNESS_ROOT, os.environ.get("PYTHONPATH")]))


def _lose_unsynced(folder: Path, sync_log: Path) -> list[str]:
    """Power loss after a kill: every WAL the run fsynced is cut back to its last fsync (what the
    observer logged), as the page cache would lose it. WALs the run never touched are left alone."""
    touched = {line.split("\t")[0] for line in sync_log.read_text().splitlines()} if sync_log.exists() else set()
    cut = []
    for wal in sorted(folder.glob("state/*/*/index_state.stage.jsonl")):
        if os.path.realpath(wal) in touched:
            cut.append(walfile.damage(str(wal), "powerloss", walfile.synced_size(sync_log, str(wal))))
    return cut


_READ_ROWS = """
import json, sys, chromadb
got = chromadb.PersistentClient(path=sys.argv[1]).get_collection(sys.argv[2]).get(
    include=["documents", "metadatas", "embeddings"])
print(json.dumps({i: [d, m, [float(x) for x in e]]
                  for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"])}))
"""


def rows(db: Path) -> dict:
    """id -> [document, metadata, vector], read in a fresh process (a client kept here could
    serve stale segments after another process wrote the folder)."""
    out = subprocess.run([sys.executable, "-c", _READ_ROWS, str(db), COLLECTION], capture_output=True, text=True,
                         timeout=TIMEOUT, env=_env())
    if out.returncode != 0:
        raise RuntimeError(f"reading {db}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def _write(folder: Path, units: list[dict]) -> None:
    (folder / UNITS).write_text("".join(json.dumps(u, sort_keys=True) + "\n" for u in units), encoding="utf-8")


VECTOR_TOLERANCE = 1e-6  # float32 noise: a cached vector and a fresh one may differ in the last bit


def _same_row(a: list, b: list) -> bool:
    """Document and metadata exactly; vectors to float32 noise (rounding both to a few decimals is not
    that: two values one ulp apart round apart when a boundary lies between them, seed 2424 #51)."""
    return a[:2] == b[:2] and len(a[2]) == len(b[2]) and all(abs(x - y) <= VECTOR_TOLERANCE
                                                               for x, y in zip(a[2], b[2]))


def _differences(want: dict, got: dict) -> str:
    lost, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    differ = sorted(i for i in set(want) & set(got) if not _same_row(want[i], got[i]))
    parts = [f"{len(lost)} missing {lost[:3]}" if lost else "", f"{len(extra)} extra {extra[:3]}" if extra else ""]
    if differ:
        i = differ[0]
        what = [name for name, a, b in zip(("document", "metadata"), want[i], got[i]) if a != b]
        what += [] if _same_row([0, 0, want[i][2]], [0, 0, got[i][2]]) else ["vector"]
        parts.append(f"{len(differ)} differ (first {i}: {', '.join(what)}; clean {want[i][1]} got {got[i][1]})")
    return "; ".join(filter(None, parts))


def run_sequence(seed: int, index: int, steps: int, base: Path, keep: bool = False,
                 verify_each: bool = True) -> Outcome:
    """One sequence; with `verify_each`, every run that exits 0 claiming an index is verified too, so
    an "ok" over a wrong index is caught even when a later step would repair it."""
    rng = random.Random(f"{seed}:{index}")
    folder = base / f"seq{index:03d}"
    folder.mkdir(parents=True)
    world = World(units=[_unit(rng, n) for n in range(START_UNITS)], options={k: v[0] for k, v in OPTIONS.items()})
    world.next_id = START_UNITS
    out = Outcome(seed, index, [], n_steps=steps)
    began = time.monotonic()
    try:
        _write(folder, world.units)
        done = _cli(folder, ["build", *world.args()])
        out.steps.append("run finish: exit 0 (the starting index)")
        if done.returncode != 0:
            raise _Break(f"the first build exited {done.returncode}: {done.stderr[-400:]}")
        for _ in range(steps):
            world.history.append(copy.deepcopy(world.units))
            old_db = world.db
            changes = _mutate(world, rng)
            if world.db != old_db and (folder / old_db).exists():
                (folder / old_db).rename(folder / world.db)
            if rng.random() < FOLDER_STEPS:
                changes += _shuffle_folders(world, rng, folder)
            _write(folder, world.units)
            mode, extra, spec = _mode(rng)
            sigterm = spec.split("=")[0] if mode.endswith("sigterm") else ""
            sync_log = folder / "sync.log" if mode == "powerloss" else None
            done = _cli(folder, ["build", *world.args(), *extra], spec, sigterm_after=sigterm, sync_log=sync_log)
            lost = _lose_unsynced(folder, sync_log) if sync_log and done.returncode == -signal.SIGKILL else []
            out.steps.append(f"{'; '.join(changes)} | run {mode} {' '.join(extra)} {spec}: exit {done.returncode}"
                             + (f", WAL {', '.join(lost)}" if lost else ""))
            if sync_log:
                sync_log.unlink(missing_ok=True)
            allowed = {0, -signal.SIGKILL} | ({130} if mode.endswith("sigterm") else set())
            if done.returncode not in allowed:
                raise _Break(f"step {len(out.steps)} exited {done.returncode}: {done.stderr.strip()[-600:]}")
            if verify_each and done.returncode == 0 and _claims_an_index(mode, world):
                checked = _cli(folder, ["verify", *world.args()])
                if checked.returncode != 0:
                    raise _Break(f"step {len(out.steps)} exited 0 but verify fails: "
                                 f"{_failed_checks(checked.stdout + checked.stderr)}")
        final = _cli(folder, ["build", *world.args(final=True)])
        out.steps.append(f"run final (normal build, --sync-mode incremental): exit {final.returncode}")
        if final.returncode != 0:
            raise _Break(f"the final build exited {final.returncode}: {final.stderr.strip()[-600:]}")
        clean = base / f"seq{index:03d}-clean"
        clean.mkdir()
        _write(clean, world.units)
        fresh = _cli(clean, ["build", *world.args(final=True)])
        if fresh.returncode != 0:
            raise _Break(f"the clean build exited {fresh.returncode}: {fresh.stderr.strip()[-600:]}")
        diff = _differences(rows(clean / world.db), rows(folder / world.db))
        if diff:
            up_to_date = "up to date" in final.stdout
            raise _Break(f"differs from a clean build: {diff}" + (" (the final build said 'up to date')"
                                                                   if up_to_date else ""))
        checked = _cli(folder, ["verify", *world.args(final=True)])
        if checked.returncode != 0:
            raise _Break(f"verify exited {checked.returncode}: {_failed_checks(checked.stdout + checked.stderr)}")
    except _Break as exc:
        out.failure = str(exc)
    except Exception as exc:  # a harness error is a failing sequence, with its steps
        out.failure = f"{type(exc).__name__}: {exc}"
    finally:
        out.seconds = round(time.monotonic() - began, 1)
        if not keep and out.ok:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(base / f"seq{index:03d}-clean", ignore_errors=True)
    return out


def _claims_an_index(mode: str, world: World) -> bool:
    """A run that exited 0 and wrote a manifest says the collection is exactly its corpus (not with
    --write-state false, which writes none, nor --sync-mode none, which leaves old generations)."""
    return mode != "write-state-false" and world.options["--sync-mode"] != "none"


def _failed_checks(output: str) -> str:
    failed = [line for line in output.splitlines() if line.startswith("[FAIL]")]
    return " | ".join(failed)[:800] or output.strip()[-600:]


class _Break(Exception):
    """A sequence ended wrong: the message says how."""


def run(sequences: int, seed: int, steps: int, *, only: int | None = None, workers: int = 1,
        work_dir: str | None = None, keep: bool = False, verify_each: bool = True) -> list[Outcome]:
    base = Path(tempfile.mkdtemp(prefix="sequences-", dir=work_dir))
    indexes = [only] if only is not None else list(range(sequences))
    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda i: run_sequence(seed, i, steps, base, keep, verify_each), indexes))
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"folders kept in {base}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fault_injection.sequences", description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=10, help="how many sequences (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sequence (default 0)")
    p.add_argument("--steps", type=int, default=8, help="steps per sequence before the final build (default 8)")
    p.add_argument("--only", type=int, metavar="INDEX", help="run only the sequence with this index (to reproduce)")
    p.add_argument("--workers", type=int, default=2, help="sequences run at once (default 2)")
    p.add_argument("--work-dir", help="where the temporary folders go")
    p.add_argument("--keep", action="store_true", help="keep every folder for inspection")
    p.add_argument("--verbose", action="store_true", help="print the steps of passing sequences too")
    p.add_argument("--no-verify-each", action="store_true",
                   help="verify only at the end, not after every run that exits 0 with a manifest (faster)")
    args = p.parse_args(argv)
    outcomes = run(args.sequences, args.seed, args.steps, only=args.only, workers=args.workers,
                   work_dir=args.work_dir, keep=args.keep, verify_each=not args.no_verify_each)
    for o in outcomes:
        print(o.report() if not o.ok or args.verbose else
              f"sequence {o.index} (seed {o.seed}): ok, {len(o.steps)} runs, {o.seconds}s")
    failed = [o for o in outcomes if not o.ok]
    print(f"{len(outcomes)} sequences, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
