"""DESIGN §8, one test per row: bad input gets a clear message, and nothing committed is lost."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from chroma_resume import config as cfg
from chroma_resume import schema
from chroma_resume.chunking import chunk_text
from conftest import HASH_BUILD, collection_rows, lock_holder, run_cli, summary, write_corpus

pytestmark = pytest.mark.timeout(120)

WAL = "index_state.stage.jsonl"
MANIFEST = "index_state.json"


def state_dir(root: Path, collection: str = "test", model: str = "hash:32") -> Path:
    """<state-root>/<collection>/<schema_hash> for the options HASH_BUILD uses."""
    c = cfg.make_config(root=str(root), docs="corpus", collection=collection, embed_model=model)
    return Path(schema.state_dir(c))


def build(root: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(["build", *HASH_BUILD, *extra], cwd=root, env=env)


def manifest_docs(root: Path) -> dict:
    return json.loads((state_dir(root) / MANIFEST).read_text())["documents"]


def indexed_uris(root: Path) -> set[str]:
    return {meta["source_uri"] for _, meta, _ in collection_rows(root / ".chroma", "test").values()}


def warn_lines(stderr: str, key: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"[WARN] key={key} ")]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def tree_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_written(root: Path, collection: str = "test") -> None:
    """No WAL, no manifest, no LATEST anywhere under the state root, and no collection in the db."""
    state_files = files_under(root / ".chroma-state")
    assert not [f for f in state_files if not f.endswith(("writer.lock", "writer.lock.holder"))], state_files
    db = root / ".chroma"
    if db.exists():
        import chromadb

        names = {getattr(n, "name", n) for n in chromadb.PersistentClient(path=str(db)).list_collections()}
        assert collection not in names


# ---- corpus path or units file missing ------------------------------------------------

@pytest.mark.parametrize("option, value", [("--docs", "no_such_folder"), ("--units", "no_such_units.jsonl")])
def test_missing_corpus_exits_2_naming_the_path(tmp_path, option, value):
    result = run_cli(["build", option, value, "--collection", "test", "--embed-model", "hash:32", "--progress", "off"],
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert str(tmp_path / value) in result.stderr
    assert not (tmp_path / ".chroma-state").exists() and not (tmp_path / ".chroma").exists()


# ---- not UTF-8, binary ------------------------------------------------------------------

BAD_BYTES = [("latin1.md", "caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"), "not_utf8"),
             ("blob.md", b"looks like text\x00\x01\x02 but is binary\n", "binary_file")]


def test_non_utf8_and_binary_files_are_skipped_with_a_warning(workdir):
    for name, data, _ in BAD_BYTES:
        (workdir / "corpus" / name).write_bytes(data)
    result = build(workdir)
    assert result.returncode == 0, result.stderr
    for name, _, key in BAD_BYTES:
        assert [ln for ln in warn_lines(result.stderr, key) if f"path={name} " in ln], result.stderr
        assert name not in manifest_docs(workdir)
    assert indexed_uris(workdir) == set(manifest_docs(workdir)) == {f"doc{i:04d}.md" for i in range(12)}


@pytest.mark.parametrize("name, data, key", BAD_BYTES, ids=["not_utf8", "binary"])
def test_non_utf8_or_binary_with_on_read_error_fail_exits_2(workdir, name, data, key):
    (workdir / "corpus" / name).write_bytes(data)
    result = build(workdir, "--on-read-error", "fail")
    assert result.returncode == 2
    assert f"{name}: " in result.stderr and "--on-read-error fail" in result.stderr
    assert_nothing_written(workdir)


# ---- empty documents --------------------------------------------------------------------

def test_empty_and_whitespace_documents_have_no_chunks_but_are_in_the_manifest(workdir):
    blanks = {"empty.md": "", "blank.txt": " \n\t\n   \n"}
    for name, text in blanks.items():
        (workdir / "corpus" / name).write_text(text, encoding="utf-8")
    result = build(workdir)
    assert result.returncode == 0, result.stderr
    docs = manifest_docs(workdir)
    for name, text in blanks.items():
        assert docs[name]["n_chunks"] == 0
        assert docs[name]["content_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert indexed_uris(workdir) == set(docs) - set(blanks)
    again = build(workdir)  # recorded, so not re-read as new on every run
    assert again.returncode == 0 and summary(again.stdout)["docs_processed"] == "0"
    assert run_cli(["verify", *HASH_BUILD], cwd=workdir).returncode == 0


# ---- symlinks and special files ---------------------------------------------------------

def _broken(corpus: Path) -> None:
    (corpus / "broken.md").symlink_to("nowhere.md")


def _loop(corpus: Path) -> None:
    (corpus / "sub").mkdir()
    (corpus / "sub" / "inner.md").write_text("inside a sub folder\n")
    (corpus / "sub" / "up").symlink_to("..", target_is_directory=True)


def _outside(corpus: Path) -> None:
    (corpus.parent / "secret.md").write_text("outside the corpus root\n")
    (corpus / "escape.md").symlink_to("../secret.md")


def _outside_dir(corpus: Path) -> None:
    (corpus.parent / "elsewhere").mkdir()
    (corpus.parent / "elsewhere" / "far.md").write_text("outside the corpus root\n")
    (corpus / "jump").symlink_to(corpus.parent / "elsewhere", target_is_directory=True)


def _fifo(corpus: Path) -> None:  # the unreadable file root can make: opening it would block forever
    os.mkfifo(corpus / "x.md")


SKIPPED = [(_broken, "broken_symlink", "broken.md"), (_loop, "symlink_loop", "sub/up"),
           (_outside, "symlink_outside_root", "escape.md"), (_outside_dir, "symlink_outside_root", "jump"),
           (_fifo, "not_regular_file", "x.md")]


@pytest.mark.timeout(60)
def test_bad_links_and_special_files_are_skipped_with_a_warning(workdir):
    corpus = workdir / "corpus"
    for make, _, _ in SKIPPED:
        make(corpus)
    (corpus / "alias.md").symlink_to("doc0003.md")  # a link that stays inside the root is followed
    result = build(workdir)
    assert result.returncode == 0, result.stderr
    for _, key, path in SKIPPED:
        assert [ln for ln in warn_lines(result.stderr, key) if f"path={path} " in ln + " "], (path, result.stderr)
    expected = {f"doc{i:04d}.md" for i in range(12)} | {"sub/inner.md", "alias.md"}
    assert indexed_uris(workdir) == set(manifest_docs(workdir)) == expected
    docs = manifest_docs(workdir)
    assert docs["alias.md"]["content_sha256"] == docs["doc0003.md"]["content_sha256"]


def test_each_skipped_link_is_warned_once_per_build(workdir):
    for make in (_broken, _loop, _outside):
        make(workdir / "corpus")
    result = build(workdir)
    assert result.returncode == 0, result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("[WARN]")]) == 3, result.stderr
    assert json.loads((state_dir(workdir) / MANIFEST).read_text())["last_build"]["warn_count"] == 3


# ---- units JSONL ------------------------------------------------------------------------

GOOD = {"source_uri": "a", "text": "first unit text"}
BAD_UNITS = {
    "bad_json": ([GOOD, '{"source_uri": "b", "text": ', {"source_uri": "c", "text": "ok"}], [2]),
    "missing_text": ([GOOD, {"source_uri": "b"}], [2]),
    "duplicate_uri": ([GOOD, {"source_uri": "b", "text": "x"}, {"source_uri": "a", "text": "again"}], [3]),
    "all_three": ([GOOD, "not json", {"source_uri": "c"}, {"source_uri": "a", "text": "dup"}], [2, 3, 4]),
}


@pytest.mark.parametrize("case", list(BAD_UNITS))
def test_bad_units_file_exits_2_naming_the_lines(tmp_path, case):
    lines, bad = BAD_UNITS[case]
    units = tmp_path / "units.jsonl"
    units.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    result = run_cli(["build", "--units", "units.jsonl", "--collection", "test", "--embed-model", "hash:32",
                      "--progress", "off"], cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    for lineno in bad:
        assert f"{units}:{lineno}:" in result.stderr
    assert f"{units}:1:" not in result.stderr
    if case == "duplicate_uri":
        assert "first on line 1" in result.stderr
    assert not (state_dir(tmp_path) / WAL).exists()
    assert_nothing_written(tmp_path)


def test_bad_units_file_creates_no_state_dir(tmp_path):
    (tmp_path / "units.jsonl").write_text("not json\n")
    result = run_cli(["build", "--units", "units.jsonl", "--collection", "test", "--embed-model", "hash:32"],
                     cwd=tmp_path)
    assert result.returncode == 2
    assert not (tmp_path / ".chroma-state").exists()


# ---- document edited between builds -----------------------------------------------------

def test_edited_document_is_re_embedded_alone_and_its_old_generation_deleted(workdir):
    assert build(workdir).returncode == 0
    doc_id = manifest_docs(workdir)["doc0003.md"]["doc_id"]
    old_ids = {i for i in collection_rows(workdir / ".chroma", "test") if i.startswith(doc_id + ":")}
    assert old_ids
    new_text = "An edited document.\n\n" + "lantern harbor orbit signal. " * 90 + "\n"
    (workdir / "corpus" / "doc0003.md").write_text(new_text, encoding="utf-8")

    result = build(workdir)
    assert result.returncode == 0, result.stderr
    got = summary(result.stdout)
    assert (got["docs_processed"], got["changed"], got["added"], got["deleted"]) == ("1", "1", "0", "0")
    rows = collection_rows(workdir / ".chroma", "test")
    assert not old_ids & set(rows)
    sha = hashlib.sha256(new_text.encode()).hexdigest()
    mine = sorted((m["chunk_index"], d, m) for i, (d, m, _) in rows.items() if m["doc_id"] == doc_id)
    assert all(m["content_sha256"] == sha for _, _, m in mine)
    # the text hashed is the text embedded: the stored chunks are exactly the chunks of the new text
    assert [d for _, d, _ in mine] == chunk_text(new_text, 1200, 150, 200)
    assert manifest_docs(workdir)["doc0003.md"]["content_sha256"] == sha


# ---- corrupt manifest -------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape", "empty"])
def test_corrupt_manifest_exits_2_naming_the_file_and_touches_nothing(workdir, damage):
    assert build(workdir).returncode == 0
    manifest = state_dir(workdir) / MANIFEST
    before = tree_digest(workdir / ".chroma")
    original = manifest.read_bytes()
    bad = {"garbage": b"\x00\xffnot json at all", "truncated": original[: len(original) // 2],
           "wrong_shape": b'{"version": 1, "documents": 7}', "empty": b""}[damage]
    manifest.write_bytes(bad)
    (workdir / "corpus" / "doc0001.md").write_text("changed so a build would have work to do\n")

    result = build(workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(manifest) in result.stderr
    assert manifest.read_bytes() == bad
    assert not (state_dir(workdir) / WAL).exists()
    assert tree_digest(workdir / ".chroma") == before  # the database was not even opened


# ---- model path missing -----------------------------------------------------------------

@pytest.mark.parametrize("existing_index", [False, True], ids=["fresh", "over-existing-index"])
def test_missing_model_path_exits_2_before_anything_is_written(workdir, existing_index):
    before = {}
    if existing_index:
        assert build(workdir).returncode == 0
        before = tree_digest(workdir / ".chroma")
        latest = (workdir / ".chroma-state" / "test" / "LATEST").read_bytes()
    args = [a if a != "hash:32" else "./no/such/model" for a in HASH_BUILD]
    result = run_cli(["build", *args], cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert str(workdir / "no/such/model") in result.stderr
    target = state_dir(workdir, model="./no/such/model")
    assert not (target / WAL).exists() and not (target / MANIFEST).exists()
    if existing_index:  # the old index is neither reset nor re-pointed
        assert tree_digest(workdir / ".chroma") == before
        assert (workdir / ".chroma-state" / "test" / "LATEST").read_bytes() == latest
    else:
        assert_nothing_written(workdir)


# ---- invalid collection name ------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "bad..name", "-leading", "10.0.0.1", "has space"])
def test_invalid_collection_name_exits_2_with_chromas_rule(workdir, name):
    result = run_cli(["build", "--docs", "corpus", f"--collection={name}", "--embed-model", "hash:32"], cwd=workdir)
    assert result.returncode == 2
    assert repr(name) in result.stderr and cfg.CHROMA_NAME_RULE in result.stderr
    assert not (workdir / ".chroma-state").exists() and not (workdir / ".chroma").exists()


# ---- Chroma server unreachable ----------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def killed_after_3(workdir):
    """A build of the 12-document corpus SIGKILLed after its 3rd DOC_COMMITTED: an unfinished WAL."""
    killed = build(workdir, env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@3=kill"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return workdir


@pytest.mark.timeout(60)
def test_unreachable_server_exits_5_with_the_cause_and_the_run_still_resumes(killed_after_3):
    root = killed_after_3
    wal = state_dir(root) / WAL
    wal_bytes = wal.read_bytes()
    port = free_port()
    result = build(root, "--chroma-host", "127.0.0.1", "--chroma-port", str(port), "--retry-for", "2")
    assert result.returncode == 5, result.stdout + result.stderr  # bounded retries, not a hang
    assert f"Chroma at http://127.0.0.1:{port}" in result.stderr and "attempts" in result.stderr
    assert "Connect" in result.stderr and "Traceback" not in result.stderr
    assert wal.read_bytes() == wal_bytes

    resumed = build(root)  # the local run still resumes where it was killed
    assert resumed.returncode == 0, resumed.stderr
    assert "resume_active=true" in resumed.stdout and "done_docs=3" in resumed.stdout
    assert indexed_uris(root) == {f"doc{i:04d}.md" for i in range(12)}


# ---- disk full --------------------------------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "state"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def state_args(tmp_path: Path) -> list[str]:
    write_corpus(tmp_path / "corpus", 600, seed=5, sizes=(30,))
    return [*HASH_BUILD, "--upsert-batch", "64", "--state-root", "state"]


@pytest.mark.timeout(90)
def test_disk_full_exits_5_and_a_rerun_with_space_completes(tmp_path, small_tmpfs):
    args = state_args(tmp_path)
    result = run_cli(["build", *args], cwd=tmp_path)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "cannot append" in result.stderr and WAL in result.stderr and "Traceback" not in result.stderr
    sdir = Path(schema.state_dir(cfg.make_config(root=str(tmp_path), docs="corpus", collection="test",
                                              embed_model="hash:32", state_root="state")))
    assert (sdir / WAL).exists() and not (sdir / MANIFEST).exists()

    subprocess.run(["mount", "-o", "remount,size=20m", str(small_tmpfs)], check=True)
    rerun = run_cli(["build", *args], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert "resume_active=true" in rerun.stdout
    assert int(summary(rerun.stdout)["docs_resumed_skipped"]) > 0  # committed work was not lost
    check = run_cli(["verify", *args], cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(indexed_uris(tmp_path)) == 600


@pytest.mark.timeout(60)
def test_disk_full_message_names_the_cause(tmp_path, small_tmpfs):
    result = run_cli(["build", *state_args(tmp_path)], cwd=tmp_path)
    assert result.returncode == 5
    assert "No space left on device" in result.stderr, result.stderr


# ---- second writer ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_second_writer_exits_3_naming_the_holder(workdir):
    lock = state_dir(workdir).parent / "writer.lock"
    with lock_holder(workdir, lock, HASH_BUILD) as first:
        second = build(workdir)
        assert second.returncode == 3, second.stdout + second.stderr
        assert f"pid={first.pid}" in second.stderr and str(lock) in second.stderr
        assert not (state_dir(workdir) / MANIFEST).exists()

    third = build(workdir)  # the OS released the dead holder's lock
    assert third.returncode == 0, third.stderr
    assert summary(third.stdout)["docs_processed"] == "12"
