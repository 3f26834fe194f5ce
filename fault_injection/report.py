"""The matrix as a person and a CI system read it: a table, JSON, and how to reproduce a failure."""
from __future__ import annotations

import dataclasses
import json
import shlex

from .matrix import Options
from .runner import Row

COLUMNS = ("scenario", "point", "hit", "damage", "kills", "recovered", "re-emb/bound", "lost", "dup", "orphans",
           "verify", "result")


def table(rows: list[Row]) -> str:
    cells = [COLUMNS] + [(
        r.scenario, r.point, str(r.hit), r.damage, str(r.kills), _yes(r.recovered), f"{r.reembedded}/{r.bound}",
        str(r.lost), str(r.duplicated), str(r.orphans), r.verify or "-", "ok" if r.ok else "FAIL")
        for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def failures(rows: list[Row], o: Options) -> str:
    """Why each failing row failed, and the command that replays it alone."""
    out = []
    for r in rows:
        if r.ok:
            continue
        out.append(f"FAIL {r.scenario} {r.point}@{r.hit} damage={r.damage}: " + "; ".join(r.failures))
        out.append(f"  reproduce: {repro(r, o)}")
        if o.keep and r.folder:
            out.append(f"  folder: {r.folder} (golden: {r.golden})")
    return "\n".join(out)


def repro(r: Row, o: Options) -> str:
    args = ["python", "-m", "fault_injection", "--scenario", r.scenario, "--seed", str(r.seed),
            "--chain", str(o.chain), "--workers", "1", "--keep"]
    if r.point not in ("random", "golden"):
        args += ["--kill", f"{r.point}@{r.hit}", "--damage", r.damage]
    for switch in r.plant:
        args += ["--plant", switch]
    return shlex.join(args)


def to_json(rows: list[Row], o: Options, seconds: float) -> str:
    return json.dumps({
        "ok": all(r.ok for r in rows), "rows": len(rows), "kills": sum(r.kills for r in rows),
        "failed": sum(not r.ok for r in rows),
        "seconds": round(seconds, 1), "options": dataclasses.asdict(o),
        "results": [{**dataclasses.asdict(r), "ok": r.ok, "reproduce": None if r.ok else repro(r, o)}
                    for r in rows]}, indent=1)


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"
