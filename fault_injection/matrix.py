"""Which rows to run, and running them in parallel worker processes.

Each scenario's golden is built once (in parallel), then the rows of all scenarios are
planned together and run. A golden that cannot be built becomes a failing row rather
than a crashed matrix.
"""
from __future__ import annotations

import multiprocessing
import random
import shutil
import tempfile
from collections.abc import Callable
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from . import engine, runner
from .runner import Boundary, Golden, Row, RowPlan
from .scenarios import SCENARIOS, Scenario

DEFAULT_POINTS = 5  # boundaries sampled per scenario (the full matrix: >= 200 kills in ~6 minutes on 2 cores)


@dataclass(frozen=True)
class Options:
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    points: int | None = None  # None: each scenario's default; 0: every boundary
    workers: int = 2
    real_model_rows: int = 2
    seed: int = 0
    chain: int = 2
    plant: tuple[str, ...] = ()
    kill: str | None = None  # "point@hit": only that boundary
    damage: str | None = None  # overrides the scenario's damage rotation
    work_dir: str | None = None
    keep: bool = False


def choose(golds: dict[str, Golden], o: Options) -> list[RowPlan]:
    """Every row, reproducible from the seed. Scenarios are planned in order, each preferring
    the kinds of boundary the ones before it sampled least, so together they cover them all."""
    covered: Counter[str] = Counter()
    plans = []
    for name, gold in golds.items():
        s = SCENARIOS[name]
        damages = (o.damage,) if o.damage else s.damage
        if s.kind == "random":
            bounds = [Boundary("random", s.kills)]  # one row: its kill times come from the seed
        elif o.kill:
            bounds = [resolve(o.kill, gold)]
        else:
            bounds = _sample(_eligible(s, gold), _rows_wanted(s, o), random.Random(f"{o.seed}:{name}"), covered)
        covered.update(b.point for b in bounds)
        plans += [RowPlan(name, b, damages[i % len(damages)], o.chain, o.plant, seed=o.seed)
                  for i, b in enumerate(bounds)]
    return plans


def _rows_wanted(s: Scenario, o: Options) -> int | None:
    """None means every eligible boundary."""
    if s.real_model:
        return o.real_model_rows
    if o.points == 0:
        return None
    if o.points is None:
        return s.default_rows or DEFAULT_POINTS
    return min(o.points, s.default_rows) if s.default_rows else o.points


class NoSuchBoundary(ValueError):
    """A --kill that names no boundary of the scenario's clean run."""


def resolve(kill: str, gold: Golden) -> Boundary:
    """`POINT@N`, or `POINT@target`: the last hit of POINT at or before the change's anchor
    (e.g. store.after_delete@target: the delete of the target's old generation)."""
    point, _, hit = kill.rpartition("@")
    if hit != "target":
        return Boundary(point, int(hit))
    hits = [b for b in gold.boundaries[:gold.anchor + 1] if b.point == point] if gold.anchor is not None else []
    if not hits:
        raise NoSuchBoundary(f"--kill {kill}: scenario {gold.scenario} has no {point} at or before its change's anchor")
    return hits[-1]


def _eligible(s: Scenario, gold: Golden) -> list[Boundary]:
    """From the anchor on, when the change has one: the target's step is done at the kill."""
    bounds = gold.boundaries[gold.anchor or 0:]
    return [b for b in bounds if not s.points or b.point.startswith(s.points)]


def _sample(bounds: list[Boundary], n: int | None, rng: random.Random, covered: Counter) -> list[Boundary]:
    """n boundaries: each time a random hit of the kind sampled least so far (here and in
    the scenarios planned before); ties go to a random kind."""
    if n is None or n >= len(bounds):
        return bounds
    pools: dict[str, list[Boundary]] = {}
    for b in bounds:
        pools.setdefault(b.point, []).append(b)
    kinds = list(pools)
    rng.shuffle(kinds)
    for pool in pools.values():
        rng.shuffle(pool)
    counts = Counter({kind: covered[kind] for kind in kinds})
    picked: list[Boundary] = []
    while len(picked) < n:
        kind = min((k for k in kinds if pools[k]), key=lambda k: counts[k])  # min keeps the shuffled order on ties
        picked.append(pools[kind].pop())
        counts[kind] += 1
    return sorted(picked, key=bounds.index)


def _parallel(pool: ProcessPoolExecutor, tasks: dict) -> dict:
    """key -> (function, *args) run in the pool; key -> its result, or the exception it raised."""
    futures = {key: pool.submit(*task) for key, task in tasks.items()}
    out = {}
    for key, future in futures.items():
        try:
            out[key] = future.result()
        except Exception as exc:  # reported on the scenarios that needed it; the others still run
            out[key] = exc
    return out


def _once_per(scenarios: list[Scenario], key: str) -> dict:
    """One scenario per distinct value of its `key` property, in order."""
    out: dict = {}
    for s in scenarios:
        out.setdefault(getattr(s, key), s)
    return out


def _goldens(pool: ProcessPoolExecutor, names: list[str], base: Path, seed: int) -> tuple[dict, dict]:
    """Each scenario's golden and starting folder (name -> Golden, or the exception that stopped
    it). Starts and clean traced runs are built once per key and shared."""
    scenarios = [SCENARIOS[n] for n in names]
    starts = _parallel(pool, {key: (runner.make_start, s, base / "starts" / f"start{i}", seed)
                              for i, (key, s) in enumerate(_once_per(scenarios, "start_key").items())})
    traces = _parallel(pool, {key: (runner.trace, s, starts[s.start_key], base / "traces" / f"trace{i}")
                              for i, (key, s) in enumerate(_once_per(scenarios, "trace_key").items())
                              if not isinstance(starts[s.start_key], Exception)})

    def blocker(s: Scenario) -> Exception | None:
        return next((x for x in (starts[s.start_key], traces.get(s.trace_key)) if isinstance(x, Exception)), None)

    golds = _parallel(pool, {s.name: (runner.golden, s, starts[s.start_key], traces[s.trace_key], base / s.name / "golden")
                             for s in scenarios if blocker(s) is None})
    golds.update({s.name: blocker(s) for s in scenarios if blocker(s) is not None})
    return golds, {s.name: starts[s.start_key] for s in scenarios}


def run(o: Options, on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Every chosen row of every chosen scenario, in scenario order."""
    names = [n for n in o.scenarios if not (SCENARIOS[n].real_model and o.real_model_rows == 0)]
    base = Path(tempfile.mkdtemp(prefix="fault-matrix-", dir=o.work_dir))
    rows: dict[tuple[str, int], Row] = {}
    try:
        with engine.pinned(base), ProcessPoolExecutor(o.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            built, starts = _goldens(pool, names, base, o.seed)
            golds = {}
            for name, gold in built.items():
                if isinstance(gold, Exception):  # a failing row rather than a crashed matrix
                    rows[name, -1] = Row(name, "golden", 0, "none", failures=[f"golden build: {gold}"])
                    on_row(rows[name, -1])
                else:
                    golds[name] = gold
            index: dict[str, int] = {}
            futures = {}
            for plan in choose({n: golds[n] for n in names if n in golds}, o):
                i = index[plan.scenario] = index.get(plan.scenario, -1) + 1
                folder = base / plan.scenario / f"row{i:03d}"
                futures[pool.submit(runner.run_row, plan, starts[plan.scenario], folder, golds[plan.scenario])] = \
                    (plan.scenario, i)
            for future in as_completed(futures):
                rows[futures[future]] = future.result()
                on_row(rows[futures[future]])
    finally:
        if not o.keep:
            shutil.rmtree(base, ignore_errors=True)
    return [rows[key] for key in sorted(rows, key=lambda k: (names.index(k[0]), k[1]))]
