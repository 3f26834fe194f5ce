"""`python -m fault_injection`: run the crash matrix, print the table, exit 1 on any failing row."""
from __future__ import annotations

import argparse
import sys
import time

from . import matrix, report
from .scenarios import SCENARIOS
from .walfile import DAMAGES

# Planted bugs the engine honours (CHROMA_RESUME_FAILPOINTS=bug.NAME=on), and the rows built to catch them
# (tests/test_planted_bugs.py proves each one is caught there).
PLANTED_BUGS = {
    "bug.skip_old_delete": "a changed document keeps its old generation (mix)",
    "bug.commit_before_upsert": "DOC_COMMITTED logged before the upsert (cold, DOC_COMMITTED kills)",
    "bug.ignore_wal_deletions": "the plan ignores deletions the WAL recorded (undo-/restore-after-crash)",
    "bug.count_only_reconcile": "the final reconcile compares counts, not id sets (tamper-after-crash)",
    "bug.delete_before_barrier": "deletes before the WAL records justifying them are fsynced "
                                 "(undo-after-crash+fsync-off, store.after_delete@target)",
    "bug.skip_audit": "a collection marked by a run no record covers is trusted unaudited (wal-off-then-revert)",
    "bug.resume_ids_only": "a resumed document is skipped when its ids are there, whatever they hold "
                           "(meta-tamper-after-crash)",
    "bug.begin_keeps_commit": "a DOC_BEGIN over a committed generation leaves it committed (rewrite-cut-then-redone)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fault_injection", description=__doc__.split(":", 1)[1].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="scenarios:\n" + "\n".join(f"  {s.name:36} {s.why}" for s in SCENARIOS.values()))
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS), metavar="NAME",
                   help=f"run only these (repeatable): {', '.join(SCENARIOS)}")
    p.add_argument("--points", default=None, metavar="N|all",
                   help=f"boundaries per scenario (default {matrix.DEFAULT_POINTS}, fewer for slow kinds); all = every one")
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    p.add_argument("--report", metavar="FILE.json", help="also write the rows as JSON")
    p.add_argument("--real-model-rows", type=int, default=2, help="rows with the packaged model (default 2; 0 skips)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and the sampling (default 0)")
    p.add_argument("--chain", type=int, default=2, help="kills in a row per boundary: reruns die at its next hit (default 2)")
    p.add_argument("--kill", metavar="POINT@HIT", help="only this boundary, e.g. wal.after_append:DOC_COMMITTED@3; "
                   "POINT@target: its last hit at or before the anchor of the scenario's change")
    p.add_argument("--damage", choices=DAMAGES, help="damage after each kill instead of the scenario's own")
    p.add_argument("--plant", action="append", default=[], metavar="bug.NAME",
                   help="planted-bug switch for the runs under test (repeatable): " + "; ".join(
                       f"{name}: {why}" for name, why in PLANTED_BUGS.items()))
    p.add_argument("--work-dir", help="where the temporary folders go (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the folders of every row for inspection")
    return p


def options(args: argparse.Namespace) -> matrix.Options:
    points = None if args.points is None else (0 if args.points == "all" else int(args.points))
    return matrix.Options(scenarios=tuple(args.scenario or SCENARIOS), points=points, workers=args.workers,
                          real_model_rows=args.real_model_rows, seed=args.seed, chain=args.chain,
                          plant=tuple(args.plant), kill=args.kill, damage=args.damage, work_dir=args.work_dir,
                          keep=args.keep)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    o = options(args)
    began = time.monotonic()
    try:
        rows = matrix.run(o, on_row=lambda r: print(f"[ROW] {'ok  ' if r.ok else 'FAIL'} {r.scenario} "
                                                     f"{r.point}@{r.hit} ({r.seconds}s)", flush=True))
    except matrix.NoSuchBoundary as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.monotonic() - began
    print(report.table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} rows, {sum(r.kills for r in rows)} kills, {len(failed)} failed, {seconds:.0f}s")
    if failed:
        print(report.failures(rows, o))
    if args.report:
        with open(args.report, "w", encoding="utf-8") as fh:
            fh.write(report.to_json(rows, o, seconds))
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
