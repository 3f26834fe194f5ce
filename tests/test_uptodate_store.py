"""DESIGN §13 "the store proves itself": doit's up-to-date check reads the collection, not only files.

Never "up to date" over a collection that is missing, reset or another incarnation than the manifest's;
still up to date over the right one (both directions), without chromadb for an embedded store.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chroma_resume import cli, store
from chroma_resume.errors import RuntimeFailure
from chroma_resume.status import up_to_date
from conftest import run_cli, write_corpus
from test_server import build_args, server  # noqa: F401  (the `chroma run` fixture)

ARGS = ["--docs", "corpus", "--collection", "test", "--embed-model", "hash:32", "--progress", "off"]


def chroma(root: Path, code: str) -> None:
    script = "import sys, chromadb\nclient = chromadb.PersistentClient(path=sys.argv[1])\n" + code
    subprocess.run([sys.executable, "-c", script, str(root / ".chroma")], check=True, timeout=60, capture_output=True)


@pytest.fixture
def built(tmp_path: Path):
    write_corpus(tmp_path / "corpus", 6)
    assert run_cli(["build", *ARGS], tmp_path).returncode == 0
    config = cli.resolve_config({"root": str(tmp_path), "docs": "corpus", "collection": "test", "embed_model": "hash:32"},
                                folder=str(tmp_path))
    assert up_to_date(config) == (True, "corpus unchanged")
    return tmp_path, config


def test_a_missing_or_foreign_collection_is_not_up_to_date_until_rebuilt(built):
    root, config = built
    found = store.stored_fingerprint(config)
    chroma(root, "client.delete_collection('test')")
    assert up_to_date(config) == (False, "collection 'test' is missing")
    assert run_cli(["build", *ARGS], root).returncode == 0
    assert up_to_date(config)[0]

    chroma(root, "client.delete_collection('test')\n"
                 f"client.create_collection('test', metadata={{'chroma_resume:schema_hash': {found['schema_hash']!r}, "
                 "'chroma_resume:incarnation': 'someone-else'})")
    current, reason = up_to_date(config)
    assert not current and "not the one the manifest describes" in reason and "someone-else" in reason
    run_cli(["build", *ARGS], root)
    assert up_to_date(config)[0]
    # a build of another schema resets the collection: back on this schema it is a new incarnation again
    assert run_cli(["build", *ARGS, "--chunk-chars", "500"], root).returncode == 0
    assert up_to_date(config)[0] is False
    assert run_cli(["build", *ARGS], root).returncode == 0
    assert up_to_date(config)[0]


def test_writes_no_record_covers_are_not_up_to_date_until_a_build_audits_them(built):
    """--write-state false leaves the corpus and the manifest agreeing, but the collection holds what
    that run wrote: the collection's own marks say no manifest covers it."""
    root, config = built
    (root / "corpus" / "doc0001.md").write_text("an edit built without a manifest\n")
    assert run_cli(["build", *ARGS, "--write-state", "false"], root).returncode == 0
    (root / "corpus" / "doc0001.md").unlink()
    write_corpus(root / "corpus", 6)  # the corpus the manifest describes, again
    current, reason = up_to_date(config)
    assert not current and "no record covers the collection's last writes" in reason
    audited = run_cli(["build", *ARGS], root)
    assert audited.returncode == 0 and "key=audit_unrecorded_writes" in audited.stderr
    assert up_to_date(config) == (True, "corpus unchanged")


def test_the_embedded_check_reads_chromas_catalogue_without_chromadb_and_falls_back_to_the_client(built, monkeypatch):
    """The check runs on every `doit`: importing chromadb would cost more than the check itself."""
    root, config = built
    code = ("import sys; from chroma_resume import cli, store\n"
            f"c = cli.resolve_config({{'root': {str(root)!r}, 'docs': 'corpus', 'collection': 'test', "
            "'embed_model': 'hash:32'}, folder=sys.argv[1])\n"
            "from chroma_resume.status import up_to_date\n"
            "assert up_to_date(c)[0]\n"
            "print('chromadb' in sys.modules, 'torch' in sys.modules, 'doit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "False", "False"]  # and the package never imports doit itself
    catalogue = store.stored_fingerprint(config)
    assert set(catalogue) == {"schema_hash", "incarnation", "space", "writing", "recorded"}
    assert catalogue["space"] == "cosine" and catalogue["writing"] is None and catalogue["recorded"]
    import sqlite3

    def unreadable(c):
        raise sqlite3.OperationalError("no such table: collections")  # another Chroma version's catalogue
    monkeypatch.setattr(store, "catalogue_fingerprint", unreadable)
    assert store.stored_fingerprint(config) == catalogue  # the same answer, through chromadb


def test_a_server_collection_proves_itself_through_the_client(tmp_path, server):
    """A server has no catalogue file to read: the check asks it (one try, no retries), in both directions."""
    write_corpus(tmp_path / "corpus", 4)
    args = build_args(server.port)
    assert run_cli(args, tmp_path).returncode == 0
    config = cli.resolve_config({"root": str(tmp_path), "docs": "corpus", "collection": "srv", "embed_model": "hash:32",
                                 "chroma_host": "127.0.0.1", "chroma_port": server.port}, folder=str(tmp_path))
    assert up_to_date(config)[0]
    import chromadb
    chromadb.HttpClient(host="127.0.0.1", port=server.port).delete_collection("srv")
    assert up_to_date(config) == (False, "collection 'srv' is missing")
    assert run_cli(args, tmp_path).returncode == 0
    assert up_to_date(config)[0]
    server.kill()
    with pytest.raises(RuntimeFailure):  # doit's check turns this into "run"; the build then reports exit 5
        store.stored_fingerprint(config)
