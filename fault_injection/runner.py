"""One row of the matrix: run the build as a subprocess that dies, damage, rerun to completion, judge.

Every build runs in its own process group (start_new_session) so a kill reaches all of
it and nothing else. The harness never sleeps hoping for timing: it waits, with a
deadline, for a line to appear in the failpoint trace or the WAL.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from chroma_resume.state import MANIFEST_NAME

from . import compare, walfile
from .changes import CHANGES
from .scenarios import SCENARIOS, Scenario, build_command, engine_config, engine_env, engine_paths, prepare

RUN_TIMEOUT = 600.0  # seconds for one build (the real model loads in ~5 s)
WAIT_TIMEOUT = 120.0  # seconds to wait for a boundary to show up in a file
HOLD_MS = 60_000  # a sleeping failpoint that holds the lock until the harness kills the holder
TERM_WINDOW_MS = 2000  # the window in which SIGTERM lands mid-batch
_WARN = re.compile(r"^\[WARN\] key=(\w+)(.*)$", re.M)
_FIELD = re.compile(r"(missing_chunks|count|docs)=(\d+)")
UP_TO_DATE = "[BUILD] up to date"


@dataclass(frozen=True)
class Boundary:
    """One hit of a failpoint, named as the trace names it: `name[:EVENT]` and its hit number."""
    point: str
    hit: int

    def spec(self, action: str, hit: int | None = None) -> str:
        return f"{self.point}@{hit or self.hit}={action}"

    @property
    def crash_action(self) -> str:
        return "torn" if self.point.startswith("wal.append:") else "kill"

    def next_in_rerun(self) -> "Boundary":
        """Where a chained rerun dies: the next hit of this point; a resumed run logs
        RUN_RESUME where a fresh one logs RUN_START (the only way to reach those boundaries)."""
        return Boundary(self.point.replace(":RUN_START", ":RUN_RESUME"), 1)


@dataclass(frozen=True)
class RowPlan:
    scenario: str
    boundary: Boundary
    damage: str = "none"
    chain: int = 2  # at most this many kills in a row; reruns die at the next hit of the same point
    plant: tuple[str, ...] = ()  # planted-bug switches, e.g. bug.skip_old_delete
    seed: int = 0


@dataclass
class Golden:
    """A clean build of the final corpus with the final options from the scenario's starting
    state: what every row must end up equal to."""
    scenario: str
    facts: compare.Facts
    embedded: list[str]  # the chunk ids it embedded
    boundaries: list[Boundary]  # every failpoint hit of a clean first run (first options), in order
    targets: list[str] = field(default_factory=list)  # the uris the scenario's change touches
    anchor: int | None = None  # index in boundaries of the change's anchor event about a target
    folder: str = ""  # where the golden index is

    def restorable(self) -> set[str]:
        """The targets' chunks the golden kept from the starting index: a row must put back
        those the crash and the change took away, and may embed them again to do it."""
        return {i for i, (_, m, _) in self.facts.rows.items() if m.get("source_uri") in self.targets} \
            - set(self.embedded)


@dataclass
class Row:
    scenario: str
    point: str
    hit: int
    damage: str
    plant: tuple[str, ...] = ()
    seed: int = 0
    kills: int = 0  # runs that died (SIGKILL) or stopped (SIGTERM) before the one that finished
    exits: list[int] = field(default_factory=list)
    recovered: bool = False
    reembedded: int = 0
    bound: int = 0
    lost: int = 0
    duplicated: int = 0
    orphans: int = 0
    mismatched: int = 0
    verify: str = ""  # pass | fail, and "(as expected)" where it must fail (stale generations kept)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    folder: str = ""
    golden: str = ""  # the folder of the golden index it was compared with

    @property
    def ok(self) -> bool:
        return not self.failures


# ---- golden ---------------------------------------------------------------------------

def make_start(s: Scenario, folder: Path, seed: int) -> Path:
    """The starting state (shared by the scenarios of the same scenarios.start_key)."""
    prepare(s, folder, seed)
    return folder


@dataclass
class Trace:
    """A clean first run from a starting state, with the first options: where rows can die
    (shared by the scenarios of the same scenarios.trace_key)."""
    folder: Path
    boundaries: list[Boundary]
    facts: compare.Facts  # read with the first options
    embedded: list[str]


def trace(s: Scenario, start: Path, folder: Path) -> Trace:
    """Trace a clean run from the starting state; its WAL is kept to find a change's target."""
    traced = _copy(start, folder)
    _finish(_start(s, traced, f"trace={traced / 'trace.log'}", extra=("--keep-wal", "true")), traced, "traced")
    boundaries = _boundaries((traced / "trace.log").read_text().splitlines())
    return Trace(traced, boundaries, compare.read(traced, s, final=False), _embedded(traced))


def golden(s: Scenario, start: Path, tr: Trace, folder: Path) -> Golden:
    """The traced run, or when the corpus or the options change between crash and resume a
    clean build of the changed corpus with the final options from the same starting state."""
    change = CHANGES[s.change] if s.change else None
    targets, anchor = _targets(s, tr) if change else ([], None)
    facts, embedded, final = tr.facts, tr.embedded, tr.folder
    if s.changes_options or (change and change.in_golden):
        final = _copy(start, folder)
        if change and change.in_golden:
            change.apply(final, targets)
        _finish(_start(s, final, "", final=True), final, "golden")
        facts, embedded = compare.read(final, s), _embedded(final)
    if facts.verify_ok != s.verify_passes:
        raise RuntimeError(f"{s.name}: verify of the golden build: ok={facts.verify_ok}, expected "
                           f"{s.verify_passes}: {facts.verify_detail}")
    return Golden(s.name, facts, embedded, tr.boundaries, targets, anchor, str(final))


def _targets(s: Scenario, tr: Trace) -> tuple[list[str], int | None]:
    """The change's targets, and for an anchored change the index of its anchor boundary: the
    first candidate the clean run appended the anchor event for."""
    change = CHANGES[s.change]
    candidates = change.candidates(tr.folder, s)
    if not change.anchor:
        return candidates, None
    kept = next(Path(engine_paths(tr.folder, s, final=False)["state_dir"]).glob("*.done"), None)
    if kept is None:  # --wal off: no WAL to anchor on; every candidate is a target, any boundary a kill
        return candidates, None
    found = walfile.first_about(str(kept), change.anchor, candidates)
    if found is None:
        raise RuntimeError(f"{s.name}: the clean run never appended {change.anchor} for any of {candidates}")
    uri, hit = found
    return [uri], tr.boundaries.index(Boundary(f"wal.after_append:{change.anchor}", hit))


def _boundaries(lines: list[str]) -> list[Boundary]:
    hits: dict[str, int] = {}
    out = []
    for line in lines:
        point = line.rstrip(":")
        hits[point] = hits.get(point, 0) + 1
        out.append(Boundary(point, hits[point]))
    return out


# ---- a row ----------------------------------------------------------------------------

class _Attempt:
    """The mutable state of one row while its runs happen."""

    def __init__(self, plan: RowPlan, start: Path, folder: Path, gold: Golden):
        self.plan, self.s, self.gold, self.start = plan, SCENARIOS[plan.scenario], gold, start
        self.folder = _copy(start, folder)
        self.wals = {final: engine_paths(self.folder, self.s, final)["wal"] for final in (False, True)}
        self.changed = False  # the change is done: every run from now on has the final options
        self.sync_log = self.folder / "sync.log"
        self.final = {uri: sha for uri, (_, sha, _) in gold.facts.documents.items()}
        self.row = Row(plan.scenario, plan.boundary.point, plan.boundary.hit, plan.damage, plan.plant,
                       plan.seed, folder=str(self.folder), golden=gold.folder)
        self.tags: dict[int, str] = {}  # pid -> runK, the prefix of its files
        self.since_seq = 0  # the last WAL record written before the current run
        self.stderr = ""
        self.warned: set[str] = set()  # expected functional WARNs seen
        self.up_to_date = False  # the run that finished said it had nothing to do

    @property
    def wal(self) -> str:
        """The WAL of the current options (another schema keeps its own)."""
        return self.wals[self.changed]

    def spawn(self, spec: str = "", mark: bool = True) -> subprocess.Popen:
        """Start a build (logs and failpoint trace in runK.*); `mark`: the WAL records from
        here on are this run's, for the re-embedding bound."""
        if mark:
            self.since_seq = walfile.last_seq(self.wal)
        tag = f"run{len(self.tags)}"
        switches = [f"{p}=on" for p in self.plan.plant]
        proc = _start(self.s, self.folder, ";".join([*filter(None, [spec]), *switches,
                                                      f"trace={self.folder / tag}.trace"]), tag,
                      final=self.changed, sync_log=self.sync_log)
        self.tags[proc.pid] = tag
        return proc

    def trace(self, proc: subprocess.Popen) -> str:
        return str(self.folder / f"{self.tags[proc.pid]}.trace")

    def wait(self, proc: subprocess.Popen) -> int:
        rc = _wait(proc)
        self.row.exits.append(rc)
        self.stderr = (self.folder / f"{self.tags[proc.pid]}.err").read_text(errors="replace")
        self._warnings(self.stderr)
        return rc

    def landed(self, proc: subprocess.Popen, b: Boundary, hit: int) -> bool:
        """Did the run die at the hit of the boundary its failpoint names? (A kill elsewhere
        would make the row lie about what it tested.)"""
        with open(self.trace(proc), encoding="utf-8") as fh:
            points = [line.rstrip("\n:") for line in fh]
        last = points[-1] if points else "nothing"
        if last == b.point and points.count(last) == hit:
            return True
        self.fail(f"failpoint {b.point}@{hit} fired at {last}@{points.count(last)}")
        return False

    def crashed(self, damage: str) -> None:
        """After a run died: damage the WAL as the crash could, and add what it may waste;
        after the first kill, the scenario's change."""
        self.row.kills += 1
        before = walfile.records(self.wal)
        walfile.damage(self.wal, damage, walfile.synced_size(self.sync_log, self.wal))
        if damage == "powercut":
            walfile.empty_segments(str(self.folder / "db"))
        if damage == "stalehnsw":
            walfile.restore_segments(str(self.start / "db"), str(self.folder / "db"))
        # A change that makes another schema (a model swapped behind its path) wastes the first run's work.
        same_schema = self.changed or (self.wals[False] == self.wals[True] and not self._new_schema)
        self.row.bound += walfile.wasted_chunks(before, walfile.records(self.wal), self.since_seq,
                                                self.final if same_schema else {})
        if self.row.kills == 1:
            self.change()

    def change(self) -> None:
        """What happens between crash and resume; putting back what it took away is work the
        golden did not do, so it adds to the bound (only what Chroma really lacks)."""
        if self.s.change:
            change = CHANGES[self.s.change]
            if change.finish_first:
                rc = self.wait(self.spawn())
                if rc != 0:
                    self.fail(f"the run finishing before the change exited {rc}: {_tail(self.stderr)}")
            change.apply(self.folder, self.gold.targets)
            restorable = self.gold.restorable()
            if restorable:
                self.row.bound += len(restorable - compare.ids(self.folder, self.s))
            if change.new_schema:
                self.wals[True] = engine_paths(self.folder, self.s, True)["wal"]
        self.changed = True

    @property
    def _new_schema(self) -> bool:
        return bool(self.s.change and CHANGES[self.s.change].new_schema)

    def complete(self, chained: Boundary | None) -> None:
        """Rerun until a build exits 0; up to chain-1 reruns die at `chained` (if given) on the way."""
        for _ in range(self.plan.chain + 3):
            spec = chained.spec(chained.crash_action) if chained and self.row.kills < self.plan.chain else ""
            proc = self.spawn(spec)
            rc = self.wait(proc)
            if rc == 0:
                self.row.recovered = True
                self.up_to_date = UP_TO_DATE in (self.folder / f"{self.tags[proc.pid]}.out").read_text()
                return
            if rc != -signal.SIGKILL or not spec:
                return self.fail(f"rerun exited {rc}: {_tail(self.stderr)}")
            if not self.landed(proc, chained, chained.hit):
                return
            self.crashed(self.plan.damage)
        self.fail(f"no run finished after {len(self.tags)} runs")

    def wait_for(self, path: str, count: int, proc: subprocess.Popen, line: str | None = None) -> bool:
        """Until the file at `path` holds `count` lines (equal to `line`, if given); False if the run ended first."""
        deadline = time.monotonic() + WAIT_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _count_lines(path, line) >= count:
                return True
            time.sleep(0.005)
        return False

    def fail(self, why: str) -> None:
        if why not in self.row.failures:  # chained runs repeat the same complaint
            self.row.failures.append(why)

    def _warnings(self, stderr: str) -> None:
        """Repairs by the engine's safety nets count against it: a correct recovery never needs
        them (unless the scenario tampered with Chroma, which only they can repair)."""
        for key, rest in _WARN.findall(stderr):
            if key in self.s.expect_warns:
                self.warned.add(key)
                continue
            n = sum(int(v) for _, v in _FIELD.findall(rest)) or 1
            if key in ("wal_ahead_of_db", "missing_after_build"):
                self.row.lost += n
                self.fail(f"engine repaired lost chunks ({key} {rest.strip()})")
            elif key == "rows_differ_after_build":
                self.fail(f"engine repaired rewritten rows ({key} {rest.strip()})")
            elif key == "orphans_deleted":
                self.row.orphans += n
                self.fail(f"engine repaired orphans ({key} {rest.strip()})")


def run_row(plan: RowPlan, start: Path, folder: Path, gold: Golden) -> Row:
    began = time.monotonic()
    a = _Attempt(plan, start, folder, gold)
    try:
        {"kill": _kill, "sigterm": _sigterm, "writer": _writer, "random": _random}[a.s.kind](a)
        if a.row.recovered:
            _judge(a)
    except Exception as exc:  # a harness or timeout error is a failing row, not a crashed matrix
        a.fail(f"{type(exc).__name__}: {exc}")
    a.row.seconds = round(time.monotonic() - began, 2)
    return a.row


def _kill(a: _Attempt) -> None:
    b = a.plan.boundary
    proc = a.spawn(b.spec(b.crash_action))
    rc = a.wait(proc)
    if rc != -signal.SIGKILL:
        return a.fail(f"boundary not reached: first run exited {rc}")
    if not a.landed(proc, b, b.hit):
        return
    a.crashed(a.plan.damage)
    a.complete(b.next_in_rerun())


def _sigterm(a: _Attempt) -> None:
    """A sleep after an upsert opens a window; SIGTERM in it must finish the batch and exit 130."""
    b = a.plan.boundary
    proc = a.spawn(b.spec(f"sleep({TERM_WINDOW_MS})"))
    if not a.wait_for(a.trace(proc), b.hit, proc, line=b.point):
        _stop(proc)
        return a.fail(f"boundary not reached: exit {a.wait(proc)}")
    os.kill(proc.pid, signal.SIGTERM)
    rc = a.wait(proc)
    last = walfile.records(a.wal)[-1:]
    if rc != 130:
        a.fail(f"SIGTERM: exit {rc}, expected 130")
    elif not (last and last[0].tag == "RUN_FINISH" and last[0].event.reason == "interrupted"):
        a.fail(f"SIGTERM: last WAL record is {last[0].tag if last else 'none'}, expected RUN_FINISH interrupted")
    a.crashed("none")
    a.complete(None)


def _writer(a: _Attempt) -> None:
    """While a build holds the lock, a second one must exit 3 naming the holder; once the
    holder is SIGKILLed the OS releases the lock and a rerun finishes."""
    b = a.plan.boundary
    holder = a.spawn(b.spec(f"sleep({HOLD_MS})"))
    try:
        if not a.wait_for(a.trace(holder), b.hit, holder, line=b.point):
            return a.fail("boundary not reached: the holder ended first")
        second = a.wait(a.spawn(mark=False))
        if second != 3 or f"pid={holder.pid}" not in a.stderr:
            a.fail(f"second writer: exit {second}, expected 3 naming pid={holder.pid}: {_tail(a.stderr)}")
    finally:
        _stop(holder)
    if a.wait(holder) != -signal.SIGKILL:
        return a.fail("the holder was not killed")
    a.crashed("none")
    a.complete(None)


def _random(a: _Attempt) -> None:
    """SIGKILL at random moments, several times in a row: each run is killed a random few WAL
    records into its work plus a random sub-record delay, so the kill lands between or inside
    any of the engine's steps (not at a failpoint) and never after the run already finished."""
    rng = random.Random(a.plan.seed)
    for _ in range(a.s.kills):
        written = _count_lines(a.wal)
        proc = a.spawn()
        if a.wait_for(a.wal, written + rng.randint(2, 60), proc):
            time.sleep(rng.uniform(0.0, 0.02))  # a random offset past that record, not a timing hope
            _stop(proc)
        rc = a.wait(proc)
        if rc == 0:
            break
        if rc != -signal.SIGKILL:
            return a.fail(f"run exited {rc}: {_tail(a.stderr)}")
        a.crashed(a.plan.damage)
    a.complete(None)


def _judge(a: _Attempt) -> None:
    row, gold = a.row, a.gold
    got = compare.read(a.folder, a.s)
    may_differ = gold.facts.stale if a.s.stale_may_differ else set()
    d = compare.diff(gold.facts, got, may_differ)
    row.reembedded = len(_embedded(a.folder)) - len(gold.embedded)
    row.lost += len(d.lost)
    row.orphans += len(d.orphans)
    row.duplicated, row.mismatched = d.duplicated, len(d.mismatched)
    # verify expects exactly the manifest's ids: it fails where stale generations stayed
    verify_expected = not (set(got.rows) & may_differ) if may_differ else gold.facts.verify_ok
    row.verify = ("pass" if got.verify_ok else "fail") + ("" if verify_expected else " (as expected)")
    space = engine_config(a.folder, a.s).hnsw_space
    unseen = sorted(set(a.s.expect_warns) - a.warned)
    checks = [
        (row.reembedded <= row.bound, f"re-embedded {row.reembedded} chunks, bound {row.bound}"),
        (not d.lost, f"lost {len(d.lost)} chunks: {d.lost[:3]}"),
        (not d.orphans, f"{len(d.orphans)} orphans: {d.orphans[:3]}"),
        (not d.duplicated, f"{d.duplicated} duplicated chunks"),
        (not d.mismatched, f"{len(d.mismatched)} chunks differ from the golden: {d.mismatched[:3]}"),
        (got.verify_ok == verify_expected, f"verify: ok={got.verify_ok}, expected ok={verify_expected}: "
                                           f"{got.verify_detail}"),
        (not got.wal_present, "the WAL is still there"),
        (d.manifest_ok, "the manifest's documents differ from the golden's"),
        (got.space == space, f"the collection's index uses space {got.space}, the options say {space}"),
        (got.fingerprint == gold.facts.fingerprint,
         f"the collection records schema {got.fingerprint}, the golden's records {gold.facts.fingerprint}"),
        (not unseen, f"no WARN {', '.join(unseen)}: the tampering was not repaired"),
    ]
    for ok, why in checks:
        if not ok:
            a.fail(why)
    if row.failures and a.up_to_date:
        a.fail(f"the last run said '{UP_TO_DATE}' over this index")


# ---- processes and files --------------------------------------------------------------

def _start(s: Scenario, folder: Path, failpoints: str, tag: str = "run", *, final: bool = False,
           sync_log: Path | None = None, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    with open(folder / f"{tag}.out", "wb") as out, open(folder / f"{tag}.err", "wb") as err:
        return subprocess.Popen(build_command(s, *extra, final=final), cwd=folder,
                                env=engine_env(failpoints, sync_log), stdout=out, stderr=err, start_new_session=True)


def _wait(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        _stop(proc)
        proc.wait()
        raise TimeoutError(f"a build ran longer than {RUN_TIMEOUT:.0f}s") from None


def _stop(proc: subprocess.Popen) -> None:
    """SIGKILL the build's whole process group (it is the group leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _finish(proc: subprocess.Popen, folder: Path, what: str) -> None:
    rc = _wait(proc)
    if rc != 0:
        raise RuntimeError(f"{what} build in {folder} exited {rc}: {_tail((folder / 'run.err').read_text())}")


def _copy(src: Path, dst: Path) -> Path:
    """A copy of a folder, relocated: the engine records the absolute path of its database in
    the manifest (and distrusts a manifest of another database), so the copy's manifests are
    made to name the copy, as if its starting index had been built there."""
    shutil.copytree(src, dst, symlinks=True)
    for manifest in dst.glob(f"state/*/*/{MANIFEST_NAME}"):
        manifest.write_text(manifest.read_text(encoding="utf-8").replace(str(src), str(dst)), encoding="utf-8")
    return dst


def _embedded(folder: Path) -> list[str]:
    """The chunk ids every run in `folder` embedded, from the engine's --embed-log."""
    try:
        return (folder / "embed.log").read_text(encoding="utf-8").split()
    except FileNotFoundError:
        return []


def _count_lines(path: str, line: str | None = None) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for have in fh if line is None or have.decode(errors="replace").rstrip("\n:") == line)
    except FileNotFoundError:
        return 0


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])
