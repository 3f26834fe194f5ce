"""One CI report for every index: `doit verify --junit FILE.xml --report FILE.json`.

Under doit each index is verified by its own sub-task (`verify:docs`, `verify:notes`), possibly in
parallel processes (`doit -n 2`), yet CI wants one JUnit file with a test suite per index and one JSON
report. So each sub-task merges its result into both files when it finishes, under an flock on the
files' folder (no lock file left behind), written atomically. Every file carries the token of the doit
run that wrote it: the first sub-task of a new run starts the files afresh, the others add to them, so a
suite never survives from an earlier run. The fresh files list every index of the repository as "not
run" (a skipped test case), so an index doit never reached (it stops at the first failure unless run
with --continue) or that was not selected is visible in the report, not silently absent.

The JSON keeps what the CLI's own report holds per index (checks, fix, --deep sample, retrieval scores)
plus the index's exact exit code (DESIGN §7), which doit's own exit status cannot carry: doit exits 1
when a check failed and 2 when an index could not be checked at all (usage, lock, WAL, store).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from . import osfs
from .errors import RuntimeFailure, UsageError

MEANING = {0: "ok", 1: "a check failed", 2: "usage or input error", 3: "another writer holds the lock",
           4: "WAL corrupt, refusing to resume", 5: "Chroma unreachable or unreadable, disk or I/O error",
           130: "interrupted"}


def doit_status(codes: list[int]) -> int:
    """What doit itself exits with for these per-index codes: 2 (error) beats 1 (failure) beats 0."""
    return 2 if any(code not in (0, 1) for code in codes) else max(codes, default=0)


def record(run: str, index: str, exit_code: int, result: dict | None, planned: dict[str, str],
           json_path: str | None, junit_path: str | None) -> None:
    """Merge one index's outcome into the run's JSON report and JUnit file (either may be None).
    planned: index -> task name, every index of the repository (this one included)."""
    entry = _entry(planned[index], exit_code, result)
    if json_path:
        with _locked(json_path):
            report = _read_json(json_path, run, planned)
            report["indexes"][index] = entry
            ran = [e["exit_code"] for e in report["indexes"].values() if e["exit_code"] is not None]
            report.update(ok=all(code == 0 for code in ran), exit_code=doit_status(ran),
                          not_run=[name for name, e in report["indexes"].items() if e["exit_code"] is None])
            _replace(json_path, json.dumps(report, indent=1, ensure_ascii=False).encode())
    if junit_path:
        with _locked(junit_path):
            root = _read_junit(junit_path, run, planned)
            for position, old in enumerate(root.findall("testsuite")):
                if old.get("name") == planned[index]:
                    root.remove(old)
                    root.insert(position, _suite(planned[index], index, entry))
            _totals(root)
            _replace(junit_path, ET.tostring(root, encoding="utf-8", xml_declaration=True))


def _entry(task: str, exit_code: int | None, result: dict | None) -> dict:
    meaning = "not run" if exit_code is None else MEANING.get(exit_code, "error")
    return {"task": task, "exit_code": exit_code, "meaning": meaning, **(result or {}), "ok": exit_code == 0}


def _suite(task: str, index: str, entry: dict) -> ET.Element:
    suite = ET.Element("testsuite", name=task)
    if entry["exit_code"] is None:
        case = ET.SubElement(suite, "testcase", classname=f"chroma_resume.verify.{index}", name="run")
        ET.SubElement(case, "skipped", message="not run in this doit run (not selected, or doit stopped first)")
    for check in entry.get("checks", []):
        case = ET.SubElement(suite, "testcase", classname=f"chroma_resume.verify.{index}", name=check["name"])
        if not check["ok"]:
            ET.SubElement(case, "failure", message=check["detail"][:200]).text = (
                f"{check['detail']}\nfix: {check.get('fix', '')}")
    if entry["exit_code"] not in (None, 0, 1):  # the index could not be checked: an error, not a failed check
        case = ET.SubElement(suite, "testcase", classname=f"chroma_resume.verify.{index}", name="run")
        ET.SubElement(case, "error", message=f"exit {entry['exit_code']}: {entry['meaning']}").text = (
            f"{task} exited {entry['exit_code']} ({entry['meaning']}); its output names the cause")
    cases = suite.findall("testcase")
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(sum(c.find("failure") is not None for c in cases)))
    suite.set("errors", str(sum(c.find("error") is not None for c in cases)))
    suite.set("skipped", str(sum(c.find("skipped") is not None for c in cases)))
    return suite


def _totals(root: ET.Element) -> None:
    for key in ("tests", "failures", "errors", "skipped"):
        root.set(key, str(sum(int(s.get(key, "0")) for s in root.findall("testsuite"))))


def _read_json(path: str, run: str, planned: dict[str, str]) -> dict:
    try:
        with open(path, "rb") as fh:
            report = json.loads(fh.read())
        if report.get("run") == run and isinstance(report.get("indexes"), dict):
            return report
    except (OSError, ValueError):
        pass
    return {"run": run, "indexes": {index: _entry(task, None, None) for index, task in planned.items()}}


def _read_junit(path: str, run: str, planned: dict[str, str]) -> ET.Element:
    try:
        root = ET.parse(path).getroot()
        if root.tag == "testsuites" and root.get("run") == run:
            return root
    except (OSError, ET.ParseError):
        pass
    root = ET.Element("testsuites", name="chroma-resume verify", run=run)
    root.extend(_suite(task, index, _entry(task, None, None)) for index, task in planned.items())
    return root


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """A lock per report: sub-tasks in parallel processes merge one at a time. It lives in the
    temp folder, keyed by the report's path, so the report's folder holds only reports (and a
    folder cannot be locked on Windows)."""
    report = os.path.abspath(path)
    key = hashlib.sha256(os.path.normcase(report).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    lock = contextlib.ExitStack()
    try:
        os.makedirs(os.path.dirname(report), exist_ok=True)
        lock.enter_context(osfs.exclusive_lock(os.path.join(tempfile.gettempdir(), f"chroma-resume-report-{key}.lock")))
    except OSError as exc:
        raise UsageError(f"cannot write report {path}: {exc.strerror or exc}") from None
    with lock:
        yield


def _replace(path: str, data: bytes) -> None:
    """Always bytes (UTF-8 encoded by the caller): a report never depends on the console's code page."""
    try:
        osfs.atomic_write(os.path.abspath(path), data)
    except RuntimeFailure as exc:
        raise UsageError(f"report: {exc}") from None
