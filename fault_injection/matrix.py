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

from . import runner
from .runner import Boundary, Golden, Row, RowPlan
from .scenarios import SCENARIOS, Scenario

DEFAULT_POINTS = 8  # boundaries sampled per scenario


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
            point, _, hit = o.kill.rpartition("@")
            bounds = [Boundary(point, int(hit))]
        else:
            bounds = _sample(_eligible(s, gold.boundaries), _rows_wanted(s, o), random.Random(f"{o.seed}:{name}"),
                             covered)
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


def _eligible(s: Scenario, bounds: list[Boundary]) -> list[Boundary]:
    if s.mutate:  # the edited/deleted document must already be committed: after the first DOC_COMMITTED
        first = next(i for i, b in enumerate(bounds) if b.point == "wal.after_append:DOC_COMMITTED")
        bounds = bounds[first + 1:]
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


def _golden_task(name: str, folder: Path, seed: int) -> tuple[Golden, Path]:
    s = SCENARIOS[name]
    start = runner.make_start(s, folder, seed)
    return runner.golden(s, start, folder), start


def run(o: Options, on_row: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Every chosen row of every chosen scenario, in scenario order."""
    names = [n for n in o.scenarios if not (SCENARIOS[n].real_model and o.real_model_rows == 0)]
    base = Path(tempfile.mkdtemp(prefix="fault-matrix-", dir=o.work_dir))
    rows: dict[tuple[str, int], Row] = {}
    try:
        with ProcessPoolExecutor(o.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            started = {n: pool.submit(_golden_task, n, base / n, o.seed) for n in names}
            golds, starts = {}, {}
            for name, future in started.items():
                try:
                    golds[name], starts[name] = future.result()
                except Exception as exc:  # reported as a failing row; the other scenarios still run
                    rows[name, -1] = Row(name, "golden", 0, "none", failures=[f"golden build: {exc}"])
                    on_row(rows[name, -1])
            index: dict[str, int] = {}
            futures = {}
            for plan in choose(golds, o):
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
