"""Breaks the second adversarial pass found in printed fixes and inputs, each proven mended.

A printed fix is a command line rendered from the options in effect (commands.py); it must parse back to
the same configuration wherever it is pasted, name the index it is about, and set what a repair needs
(a manifest written, orphans deleted) even where the configuration says otherwise.
"""
from __future__ import annotations

import shlex

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chroma_resume import cli, config as cfg
from chroma_resume.commands import command_line
from conftest import HASH_BUILD, run_cli, run_shell, write_corpus
from test_verify import printed_fix

pytestmark = pytest.mark.timeout(240)

# Paths and globs as people name them: spaces, a leading dash, quotes, non-ASCII.
_NAME = st.text(st.sampled_from("ab -_.'\"é*"), min_size=1, max_size=8).filter(lambda s: s.strip() == s and s.strip("-"))


@settings(max_examples=60, deadline=None)
@given(docs=_NAME, db=_NAME, exclude=st.lists(_NAME, max_size=3), chunk=st.integers(300, 4000),
       space=st.sampled_from(["cosine", "l2", "ip"]), write_state=st.booleans())
def test_a_printed_command_line_parses_back_to_the_same_configuration(docs, db, exclude, chunk, space, write_state):
    c = cfg.make_config(root="/tmp/some root", docs=docs, db=db, exclude=tuple(exclude), chunk_chars=chunk,
                        overlap_chars=100, min_chunk_chars=100, hnsw_space=space, collection="test",
                        write_state=write_state)
    words = shlex.split(command_line(c, "build"))
    args = cli.parser().parse_args(words[1:])
    options = {name.replace("-", "_"): getattr(args, name.replace("-", "_"), None) for name, _, _ in cli.OPTIONS}
    assert cli.resolve_config(options, folder="/nonexistent") == c


def test_a_fix_names_the_index_and_runs_from_another_folder(tmp_path):
    root = tmp_path / "repo"
    write_corpus(root / "notes", 5)
    (root / "pyproject.toml").write_text('[tool.chroma-resume]\nembed-model = "hash:32"\nprogress = "off"\n'
                                         '[tool.chroma-resume.indexes.main]\ndocs = "notes"\n')
    assert run_cli(["build", "--index", "main"], cwd=root).returncode == 0
    (root / ".chroma-state" / "main").joinpath("LATEST").unlink()  # a manifest check that fails
    failing = run_cli(["verify", "--index", "main"], cwd=root)
    assert failing.returncode == 1
    fix = printed_fix(failing)
    assert "--index=main" in fix and f"--root={root}" in fix
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert run_shell(fix, elsewhere).returncode == 0
    assert run_cli(["verify", "--index", "main"], cwd=root).returncode == 0


@pytest.mark.parametrize("option", [["--write-state", "false"], ["--sync-mode", "none"]])
def test_a_fix_under_options_that_keep_a_check_failing_overrides_them(tmp_path, option):
    write_corpus(tmp_path / "corpus", 6)
    assert run_cli(["build", *HASH_BUILD], cwd=tmp_path).returncode == 0
    (tmp_path / "corpus" / "doc0001.md").unlink()
    assert run_cli(["build", *HASH_BUILD, *option], cwd=tmp_path).returncode == 0
    failing = run_cli(["verify", *HASH_BUILD, *option], cwd=tmp_path)
    assert failing.returncode == 1
    assert run_shell(printed_fix(failing), tmp_path).returncode == 0
    assert run_cli(["verify", *HASH_BUILD, *option], cwd=tmp_path).returncode == 0


def test_an_emptied_chroma_sqlite_is_a_broken_store_and_verify_does_not_fill_it(tmp_path):
    write_corpus(tmp_path / "corpus", 4)
    assert run_cli(["build", *HASH_BUILD], cwd=tmp_path).returncode == 0
    sqlite = tmp_path / ".chroma" / "chroma.sqlite3"
    sqlite.write_bytes(b"")
    failing = run_cli(["verify", *HASH_BUILD], cwd=tmp_path)
    assert failing.returncode == 1 and "[FAIL] store" in failing.stdout and sqlite.stat().st_size == 0
    assert "repair" in printed_fix(failing)
    rebuilt = run_cli(["build", *HASH_BUILD], cwd=tmp_path)
    assert rebuilt.returncode == 0 and "key=store_set_aside" in rebuilt.stderr
    assert run_cli(["verify", *HASH_BUILD], cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("command", ["verify", "resume-status"])
def test_a_state_root_that_is_a_file_is_exit_2(tmp_path, command):
    write_corpus(tmp_path / "corpus", 2)
    (tmp_path / "state").write_text("not a folder")
    done = run_cli([command, *HASH_BUILD, "--state-root", "state"], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "state" in done.stderr


def test_an_unbounded_stand_in_dimension_is_refused(tmp_path):
    write_corpus(tmp_path / "corpus", 2)
    done = run_cli(["build", "--docs", "corpus", "--embed-model", "hash:9223372036854775808"], cwd=tmp_path)
    assert done.returncode == 2 and "hash:DIM, DIM from 1 to 65536" in done.stderr


def test_a_misspelt_units_key_is_exit_2_naming_line_and_key(tmp_path):
    (tmp_path / "units.jsonl").write_text('{"source_uri": "a", "text": "x"}\n'
                                          '{"source_uri": "b", "text": "y", "metdata": {"k": 1}}\n')
    done = run_cli(["build", "--units", "units.jsonl", "--embed-model", "hash:32"], cwd=tmp_path)
    assert done.returncode == 2 and "units.jsonl:2" in done.stderr and "metdata" in done.stderr
    assert not (tmp_path / ".chroma").exists()
