"""Inputs and options that used to crash, hang or drop silently (issue 14, DESIGN §8): each is now a clear
error naming its line, file or option (exit 2), or a WARN; never a traceback."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chroma_resume import cli, corpus
from chroma_resume.errors import UsageError
from conftest import HASH_BUILD, run_cli, summary

pytestmark = pytest.mark.timeout(180)


def units_file(root: Path, *metadatas) -> Path:
    path = root / "units.jsonl"
    path.write_text("".join(json.dumps({"source_uri": f"u{i}", "text": f"unit {i}", "metadata": m}) + "\n"
                            for i, m in enumerate(metadatas)))
    return path


def scan_units(root: Path) -> list[corpus.Document]:
    return list(corpus.scan(cli.resolve_config({"root": str(root), "units": "units.jsonl"}), lambda *a, **k: None))


@pytest.mark.parametrize("value, said", [
    (2**63, "'k': 9223372036854775808 is outside int64"), (-2**63 - 1, "'k': -9223372036854775809 is outside int64"),
    ([1, 2], "'k': a list value"), ({"a": 1}, "'k': a dict value"), (None, "'k': a null value")])
def test_units_metadata_chroma_cannot_store_exactly_is_exit_2_naming_the_line(tmp_path, value, said):
    units_file(tmp_path, {"ok": 1}, {"k": value})
    with pytest.raises(UsageError, match=rf"units.jsonl:2: metadata {said}"):
        scan_units(tmp_path)


@pytest.mark.parametrize("key, said", [("chroma:document", "reserved by Chroma"), ("", "an empty key"),
                                       ("doc_id", "written by chroma-resume on every chunk")])
def test_units_metadata_keys_that_would_fail_mid_run_are_refused_at_read_time(tmp_path, key, said):
    units_file(tmp_path, {key: "x"})
    with pytest.raises(UsageError, match=f"units.jsonl:1: metadata key {key!r}: {said}"):
        scan_units(tmp_path)


def test_units_metadata_at_the_edges_is_stored_exactly_and_verifies(tmp_path):
    edges = {"big": 2**63 - 1, "small": -2**63, "f": 1.5, "b": True, "s": ""}
    units_file(tmp_path, edges)
    assert scan_units(tmp_path)[0].metadata == edges  # nothing dropped, nothing converted
    base = [a for a in HASH_BUILD if a not in ("--docs", "corpus")] + ["--units", "units.jsonl"]
    assert run_cli(["build", *base], cwd=tmp_path).returncode == 0
    result = run_cli(["verify", *base, "--fresh"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout


def test_a_file_name_that_is_not_utf8_is_warned_escaped_and_kept(workdir):
    os.makedirs(os.path.join(bytes(workdir / "corpus"), b"dir\xfe"))
    Path(os.path.join(bytes(workdir / "corpus"), b"bad\xff.md").decode("utf-8", "surrogateescape")).write_text("x")
    built = run_cli(["build", *HASH_BUILD], cwd=workdir)
    assert built.returncode == 0, built.stderr
    assert "key=not_utf8_name path=bad\\xff.md" in built.stderr and "path=dir\\xfe" in built.stderr
    assert summary(built.stdout)["docs_current"] == "12"
    refused = run_cli(["build", *HASH_BUILD, "--on-read-error", "fail"], cwd=workdir)
    assert refused.returncode == 2 and "not valid UTF-8" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("options, said", [
    ({"chroma_port": 0}, "--chroma-port 0: a TCP port"), ({"chroma_port": 99999}, "--chroma-port 99999"),
    ({"chroma_timeout": 0}, "--chroma-timeout 0: seconds per request"), ({"retry_for": -1}, "--retry-for -1"),
    ({"embed_model": "hash:0"}, "hash:DIM, DIM from 1 to 65536"), ({"strict_sync": "maybe"}, "--strict-sync: expected"),
    ({"chunk_chars": "many"}, r"\(--chunk-chars\)"),
    ({"ray_cpus_per_worker": "nan"}, "--ray-cpus-per-worker nan: a number"),
    ({"ray_gpus_per_worker": "inf"}, "--ray-gpus-per-worker inf"),
    ({"db": ""}, "--db is empty"), ({"state_root": " "}, "--state-root is empty"),
    ({"chroma_host": ""}, "--chroma-host is empty"), ({"device": "bogus"}, "--device 'bogus': expected cpu, cuda"),
    ({"device": "cuda:x"}, "--device 'cuda:x'")])
def test_bad_option_values_are_refused_when_parsed_naming_the_option(tmp_path, options, said):
    with pytest.raises(UsageError, match=said):
        cli.resolve_config({"docs": "corpus", **options}, folder=str(tmp_path))


def test_a_corpus_on_the_command_line_replaces_the_configured_one(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool.chroma-resume]\ndocs = "corpus"\ncollection = "mine"\n')
    c = cli.resolve_config({"units": "u.jsonl"}, folder=str(tmp_path))
    assert (c.docs, c.units, c.collection) == (None, "u.jsonl", "mine")


def test_an_uncreatable_db_is_exit_2_naming_it_without_retries(workdir):
    (workdir / "blocker").write_text("a file where a folder should be\n")
    result = run_cli(["build", *HASH_BUILD, "--db", "blocker/db"], cwd=workdir)
    assert result.returncode == 2 and "--db" in result.stderr and "blocker/db" in result.stderr
    assert "[WAIT]" not in result.stderr and "Traceback" not in result.stderr


def test_a_hub_model_missing_locally_fails_at_once_without_the_offline_variable(workdir):
    result = run_cli(["build", "--docs", "corpus", "--embed-model", "no-such-org/no-such-model"], cwd=workdir,
                     env={"HF_HUB_OFFLINE": ""})  # empty is not offline, for the hub library and for us
    assert result.returncode == 2, result.stderr
    assert "not in the local hub cache" in result.stderr and "--model-download true fetches it" in result.stderr
    assert not (workdir / ".chroma").exists()


def test_an_unwritable_embed_log_is_exit_2_before_anything_is_embedded(workdir):
    (workdir / "log-dir").mkdir()
    result = run_cli(["build", *HASH_BUILD, "--embed-log", "log-dir"], cwd=workdir)
    assert result.returncode == 2 and "--embed-log" in result.stderr and "Traceback" not in result.stderr
    again = run_cli(["build", *HASH_BUILD], cwd=workdir)  # the run it cut short resumes
    assert again.returncode == 0 and summary(again.stdout)["chunks_embedded"] != "0"


def test_clean_wal_archive_into_an_unusable_folder_is_exit_2_and_keeps_the_wal(workdir):
    killed = run_cli(["build", *HASH_BUILD], cwd=workdir,
                     env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@2=kill"})
    assert killed.returncode != 0
    wal = next((workdir / ".chroma-state").rglob("index_state.stage.jsonl"))
    (workdir / "blocker").write_text("x")
    result = run_cli(["clean-wal", *HASH_BUILD, "--force", "--archive", "blocker/archive"], cwd=workdir)
    assert result.returncode == 2 and "--archive" in result.stderr and "Traceback" not in result.stderr
    assert wal.exists()


@pytest.mark.parametrize("how", ["include_nothing", "empty_folder"])
def test_a_build_that_would_delete_every_document_asks_for_allow_empty(workdir, how):
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    if how == "empty_folder":
        for f in (workdir / "corpus").iterdir():
            f.unlink()
    extra = ["--include", ""] if how == "include_nothing" else []
    refused = run_cli(["build", *HASH_BUILD, *extra], cwd=workdir)
    assert refused.returncode == 2 and "--allow-empty true" in refused.stderr and "12 documents" in refused.stderr
    assert run_cli(["verify", *HASH_BUILD], cwd=workdir).returncode == 0  # untouched
    emptied = run_cli(["build", *HASH_BUILD, *extra, "--allow-empty", "true"], cwd=workdir)
    assert emptied.returncode == 0 and summary(emptied.stdout)["deleted"] == "12"


def test_help_says_what_the_tool_does_and_status_reads_at_a_glance(workdir):
    shown = run_cli(["--help"], cwd=workdir).stdout
    assert "Build and keep a Chroma vector index" in shown and "exit codes" in shown
    status = run_cli(["resume-status", *HASH_BUILD], cwd=workdir)
    lines = status.stdout.splitlines()
    assert lines[1].startswith("[STATUS] index 'test'") and "no manifest" in lines[1]
    assert lines[2] == "[STATUS] no unfinished run: the next build starts a new one"
    values = summary(status.stdout)
    assert values["wal_version"] == "none" and values["wal_finished_ok"] == "none"
    as_json = json.loads(run_cli(["resume-status", *HASH_BUILD, "--json"], cwd=workdir).stdout)
    assert as_json["wal_version"] is None and as_json["wal_run_id"] is None


def test_an_empty_report_name_is_refused_before_the_checks(workdir):
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    for option in ("--report", "--junit"):
        result = run_cli(["verify", *HASH_BUILD, option, ""], cwd=workdir)
        assert result.returncode == 2 and "need a file name" in result.stderr and "[PASS]" not in result.stdout


def test_a_manifest_from_a_newer_version_is_refused_not_misread(workdir):
    assert run_cli(["build", *HASH_BUILD], cwd=workdir).returncode == 0
    manifest = next(workdir.glob(".chroma-state/test/*/index_state.json"))
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "version": 99}))
    for command in ("build", "verify"):
        result = run_cli([command, *HASH_BUILD], cwd=workdir)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "is version 99, written by a newer chroma-resume" in result.stderr + result.stdout
    assert json.loads(manifest.read_text())["version"] == 99  # left as it was
