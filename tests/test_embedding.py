"""Embedders: float32 arrays, the model's own max length, device/precision rules, a torch-free
fingerprint, token-length batching equal to FlagModel.encode, and bit-exact cached vectors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chroma_resume import cache, embedders, models
from chroma_resume.config import make_config
from chroma_resume.errors import ModelLoadError
from chroma_resume.reporting import Warnings

MIXED = [
    "The printing press spread quickly across Europe, and with it the habit of reading silently. " * 3,
    "预写式日志在修改数据之前先把变更记录下来，崩溃之后可以重放日志恢复到一致的状态。" * 2,
    "def flush(buffer, size):\n    batch = [buffer.popleft() for _ in range(min(size, len(buffer)))]\n    return batch\n",
    "Short prose.",
    "索引",
    "for (int i = 0; i < n; ++i) { total += values[i] * weights[i]; }",
    "A long paragraph about rivers, harbors and lanterns, written to be longer than the model's window. " * 40,
    "向量索引把文本切成块，每一块都交给模型计算嵌入。",
    "SELECT key, dim, vector FROM vectors WHERE key IN (?, ?, ?);",
]


# ---- the stand-in ------------------------------------------------------------------

def test_hash_embedder_keeps_its_values_as_float32_and_counts_texts():
    embedder = embedders.HashEmbedder(8)
    vectors = embedder.encode(["abc", "日本語 text"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, 8)
    # float32 bit patterns of the values the list-of-floats stand-in produced before this change
    assert vectors.view("<u4").tolist() == [
        [3190106154, 3191275852, 3205748624, 1058641561, 3136789863, 3190551196, 1055660050, 3182712840],
        [1057550711, 1013899714, 1050241577, 3184187900, 1049518846, 1058793413, 1049894913, 3197286249]]
    assert (embedder.dim, embedder.name, embedder.embedded) == (8, "hash:8", 2)
    assert embedder.encode([]).shape == (0, 8)


# ---- device and precision -----------------------------------------------------------

@pytest.mark.parametrize("device, fp16, cuda_count, expected", [
    ("cpu", "auto", 0, "cpu"),
    ("cpu", "off", 2, "cpu"),
    ("cuda", "auto", 1, "cuda"),
    ("cuda:1", "auto", 2, "cuda:1"),
    ("cuda:0", "off", 1, "cuda:0"),
    ("cuda", "on", 1, "cuda"),
])
def test_resolve_device(device, fp16, cuda_count, expected):
    assert models.resolve_device(device, fp16, cuda_count) == expected


@pytest.mark.parametrize("device, fp16, cuda_count, named", [
    ("cpu", "on", 1, "--fp16 on"),
    ("cuda", "auto", 0, "--device cuda"),
    ("cuda:2", "auto", 2, "--device cuda:2"),
    ("gpu", "auto", 1, "--device 'gpu'"),
    ("cuda:x", "auto", 1, "--device 'cuda:x'"),
])
def test_resolve_device_refuses_naming_the_option(device, fp16, cuda_count, named):
    with pytest.raises(ModelLoadError, match=named):
        models.resolve_device(device, fp16, cuda_count)


def test_fp16_on_cpu_is_refused_at_load_before_the_model_is_read(tmp_path):
    with pytest.raises(ModelLoadError, match="--fp16 on"):
        embedders.load(make_config(root=str(tmp_path), fp16="on"))


# ---- max length and fingerprint on model folders made here ---------------------------

def fake_model(folder: Path, *, sbert=None, tokenizer=None, positions=512, weights=1000) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": positions, "hidden_size": 8}))
    if sbert is not None:
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": sbert}))
    if tokenizer is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": tokenizer}))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "model.safetensors").write_bytes(b"\0" * weights)
    (folder / "README.md").write_text("notes")
    return folder


@pytest.mark.parametrize("files, expected", [
    ({"sbert": 256, "tokenizer": 512}, 256),     # sentence-transformers' setting wins
    ({"tokenizer": 384}, 384),                    # else the tokenizer's
    ({"tokenizer": 10**30}, 512),                 # a sentinel is no limit: the position table
    ({"sbert": 1024, "tokenizer": 2048}, 512),    # capped by the position table
    ({}, 512),
])
def test_effective_max_length_reads_the_models_declarations(tmp_path, files, expected):
    fake_model(tmp_path / "m", **files)
    assert models.effective_max_length(make_config(root=str(tmp_path), embed_model="./m")) == expected


def test_effective_max_length_override_default_model_and_stand_in(tmp_path):
    assert models.effective_max_length(make_config(root=str(tmp_path))) == 256
    assert models.effective_max_length(make_config(root=str(tmp_path), max_length=64)) == 64
    assert models.effective_max_length(make_config(root=str(tmp_path), embed_model="hash:8")) is None


def test_fingerprint_is_the_models_content_not_its_name_or_path(tmp_path):
    model = fake_model(tmp_path / "m", sbert=256)

    def fp(where="./m", **options):
        return models.model_fingerprint(make_config(root=str(tmp_path), embed_model=where, **options))

    base = fp()
    assert base.startswith("model@") and "m@" not in base.split("@")[0]
    assert fp(embed_batch=7) == fp(device="cuda", fp16="off") == fp(chunk_chars=500) == base
    # precision is a tolerance, not an identity: fp16 on CUDA and bf16 on a CPU are the float32 schema
    assert fp(device="cuda") == fp(device="cuda", fp16="on") == fp(backend="torch-bf16") == base
    (model / "README.md").write_text("other notes")
    (model / "training_notes.txt").write_text("irrelevant")
    assert fp() == base
    shutil.copytree(model, tmp_path / "elsewhere")
    assert fp("./elsewhere") == base == fp(str(model))  # the same files under another path: the same model

    changed = {fp(pooling="mean"), fp(max_length=128)}
    (model / "model.safetensors").write_bytes(b"\1" * 1000)  # same size, other weights: updated in place
    changed.add(fp())
    (model / "tokenizer.json").write_text("{}")
    changed.add(fp())
    assert base not in changed and len(changed) == 4


def test_a_symlink_re_pointed_is_another_model(tmp_path):
    fake_model(tmp_path / "v1")
    fake_model(tmp_path / "v2", weights=999)
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "v1")
    c = make_config(root=str(tmp_path), embed_model="./current")
    first = models.model_fingerprint(c)
    link.unlink()
    link.symlink_to(tmp_path / "v2")
    assert models.model_fingerprint(c) != first


def test_digests_are_remembered_by_stat_and_written_by_builds_only(tmp_path, monkeypatch):
    fake_model(tmp_path / "m")
    c = make_config(root=str(tmp_path), embed_model="./m", state_root="st")
    models._MEMOS.clear()
    base = models.model_fingerprint(c)
    assert not (tmp_path / "st").exists()  # readers never write
    models.remember_digests(c)
    memo = json.loads((tmp_path / "st" / models.DIGESTS_NAME).read_text())
    assert {Path(k).name for k in memo} == {"config.json", "vocab.txt", "model.safetensors"}
    models._MEMOS.clear()
    files_hashed = []
    real_sha256 = models.hashlib.sha256

    def spy(*data):
        files_hashed.extend([1] if not data else [])  # a file digest starts from an empty hash
        return real_sha256(*data)

    monkeypatch.setattr(models.hashlib, "sha256", spy)
    assert models.model_fingerprint(c) == base and files_hashed == []  # remembered, not recomputed
    (tmp_path / "m" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n")
    assert models.model_fingerprint(c) != base and files_hashed == [1]  # only the changed file


def test_fingerprint_of_the_stand_in_and_of_a_hub_id(tmp_path, monkeypatch):
    assert models.model_fingerprint(make_config(embed_model="hash:64")) == "hash:64"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="not in the local hub cache"):
        models.model_fingerprint(make_config(root=str(tmp_path), embed_model="BAAI/bge-small-en-v1.5"))


@pytest.mark.parametrize("options, message", [
    ({"embed_model": "BAAI/bge-m3"}, "not in the local hub cache"),
    ({"embed_model": "BAAI/no-such-model-typo"}, "not in the local hub cache"),
    ({"embed_model": "./empty"}, "has no config.json"),
    ({"max_length": 5000}, "--max-length 5000 exceeds the 512 positions"),
    ({"fp16": "on"}, "--fp16 on needs a CUDA device"),
    ({"device": "cuda"}, "torch sees 0 CUDA device"),
])
def test_preflight_refuses_what_a_build_could_not_load(tmp_path, monkeypatch, options, message):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=message):
        models.preflight(make_config(root=str(tmp_path), **options))


def test_preflight_reads_dimension_and_length_without_torch(tmp_path):
    code = ("import sys\nfrom chroma_resume import models\nfrom chroma_resume.config import make_config\n"
            "info = models.preflight(make_config())\nprint(info.dim, info.max_length, info.fingerprint)\n"
            "print(sorted(m for m in ('torch', 'FlagEmbedding', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    shown, imported = done.stdout.splitlines()
    assert shown.startswith("384 256 bert@") and imported == "[]"


# ---- the real default model (loaded once) ---------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    c = make_config(root=str(tmp_path_factory.mktemp("real")), embed_batch=4, backend="torch")
    return c, embedders.load(c)


def test_load_sets_the_models_own_max_length_and_dimension(real):
    c, embedder = real
    assert embedder.flag.passage_max_length == 256 == models.effective_max_length(c)
    assert (embedder.dim, embedder.name, embedder.embedded) == (384, c.embed_model, 0)


def test_encode_equals_flagmodel_encode_on_prose_chinese_and_code(real):
    _, embedder = real
    before = embedder.embedded
    vectors = embedder.encode(MIXED)
    assert vectors.dtype == np.float32 and vectors.shape == (len(MIXED), 384)
    assert embedder.embedded - before == len(MIXED)
    reference = embedder.flag.encode(MIXED, batch_size=4, max_length=256)
    assert np.allclose(vectors, reference, atol=1e-5, rtol=0)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_batches_are_formed_by_token_count_and_padded_only_to_their_longest(real, monkeypatch):
    """Chinese text is ~1 token per character, long English words several characters per token:
    sorted by characters these interleave; sorted by tokens each batch holds one kind."""
    _, embedder = real
    tokenizer = embedder.flag.tokenizer
    chinese = ["压缩" * (20 + i) for i in range(4)]                     # 40-46 chars, ~40-46 tokens
    english = ["internationalization " * (2 + i) for i in range(4)]     # 42-105 chars, few tokens
    texts = [t for pair in zip(chinese, english) for t in pair]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    widths = []
    real_pad = tokenizer.pad

    def spy(*args, **kwargs):
        batch = real_pad(*args, **kwargs)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(tokenizer, "pad", spy)
    embedder.encode(texts)
    by_tokens = sorted(lengths, reverse=True)
    assert widths == [max(by_tokens[:4]), max(by_tokens[4:])]
    assert widths[1] < min(lengths[i] for i in range(0, 8, 2))  # no Chinese text in the short batch


def test_a_cached_vector_equals_a_fresh_one_bit_for_bit(real):
    c, embedder = real
    fingerprint = models.model_fingerprint(c)
    fresh = embedder.encode(MIXED)
    store = cache.open_cache(c, fingerprint, Warnings())
    store.put_many(MIXED, fresh)
    store.close()
    again = cache.open_cache(c, fingerprint, Warnings())
    got = again.get_many(MIXED)
    again.close()
    assert sorted(got) == list(range(len(MIXED))) and again.hits == len(MIXED)
    assert all(got[i].tobytes() == fresh[i].tobytes() for i in range(len(MIXED)))
