"""--backend onnx-int8: the checked float32 export quantized, a model identity of its own (a schema
change, its own cache entries), checked against the float32 export, and never a silent fallback."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

from chroma_resume import embedders, models, schema
from chroma_resume.embedders import onnx_runtime
from chroma_resume.config import make_config
from chroma_resume.errors import ModelLoadError, UsageError
from chroma_resume.reporting import Warnings
from conftest import REPO, collection_rows, run_cli, summary
from test_embedding import MIXED

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """One int8 load under a fresh state root (it makes the float32 export first): (config, embedder, warnings)."""
    c = make_config(root=str(tmp_path_factory.mktemp("int8")), embed_batch=4, backend="onnx-int8")
    warn = Warnings()
    return c, embedders.load(c, warn), warn


def _float32(c):
    return msgspec.structs.replace(c, backend="onnx")


def test_int8_is_a_model_identity_of_its_own(quantized, monkeypatch):
    c, _, _ = quantized
    floats = {models.model_fingerprint(msgspec.structs.replace(c, backend=b)) for b in ("auto", "torch", "onnx")}
    assert len(floats) == 1  # the float32 backends are one model: same vectors, same cache entries
    assert models.model_fingerprint(c) not in floats
    assert schema.schema_hash(c) != schema.schema_hash(_float32(c))
    assert onnx_runtime.export_dir(c) != onnx_runtime.export_dir(_float32(c))
    # another onnxruntime may quantize otherwise: another int8 model, and another folder for either export
    before = models.model_fingerprint(c), onnx_runtime.export_dir(_float32(c))
    monkeypatch.setattr(models, "package_version", lambda name, parts: "99.0")
    assert models.model_fingerprint(c) != before[0] and onnx_runtime.export_dir(_float32(c)) != before[1]
    assert models.model_fingerprint(_float32(c)) in floats  # float32 vectors do not depend on it


def test_int8_is_made_from_the_checked_float32_export(quantized):
    c, embedder, warn = quantized
    assert isinstance(embedder, onnx_runtime.OnnxEmbedder) and warn.count == 0
    base = onnx_runtime.read_meta(onnx_runtime.export_dir(_float32(c)), models.model_fingerprint(_float32(c)))
    meta = onnx_runtime.read_meta(onnx_runtime.export_dir(c), models.model_fingerprint(c))
    assert base.passed and base.quantization == ""
    assert meta.passed and meta.quantization == models.REDUCED_PRECISION["onnx-int8"]
    # quantized for real: smaller weights and vectors that moved, but within the check's bound
    assert meta.onnx_bytes < base.onnx_bytes * 0.7
    assert onnx_runtime.INT8_MIN_COSINE <= meta.worst_cosine < 0.9999
    reference = embedders.load_torch(msgspec.structs.replace(c, backend="torch"))
    cosines = np.einsum("ij,ij->i", embedder.encode(MIXED), reference.encode(MIXED))
    assert cosines.min() >= onnx_runtime.INT8_MIN_COSINE and cosines.min() < onnx_runtime.PROBE_MIN_COSINE


def test_an_int8_vector_depends_on_its_text_alone(quantized):
    """Dynamic quantization scales a whole activation tensor: in a batch, a text's vector would move
    with its neighbours, and verify --deep, a resume or the cache would disagree with the build."""
    _, embedder, _ = quantized
    together = embedder.encode(MIXED)
    for i in (0, len(MIXED) // 2, len(MIXED) - 1):
        assert np.array_equal(embedder.encode([MIXED[i]])[0], together[i])
        assert np.array_equal(embedder.encode([MIXED[i], *MIXED[:i]])[0], together[i])


def _with_float32_export(source, tmp_path: Path):
    """A fresh root holding a copy of the module's float32 export (so a test pays only for int8)."""
    c = make_config(root=str(tmp_path), embed_batch=4, backend="onnx-int8")
    shutil.copytree(onnx_runtime.export_dir(_float32(source)), onnx_runtime.export_dir(_float32(c)))
    return c


def test_a_failed_int8_check_is_an_error_and_is_remembered(quantized, tmp_path, monkeypatch):
    c = _with_float32_export(quantized[0], tmp_path)
    monkeypatch.setattr(onnx_runtime, "INT8_MIN_COSINE", 1.5)  # no quantized graph can pass
    with pytest.raises(ModelLoadError, match=r"probe check: worst cosine 0\.9\d+ to the float32 export < 1\.5.*meta\.json"):
        embedders.load(c, Warnings())
    monkeypatch.setattr(onnx_runtime, "_quantize_and_check", None)  # remembered: not quantized again
    with pytest.raises(ModelLoadError, match="delete that folder to try again"):
        embedders.load(c, Warnings())


def test_a_graph_that_does_not_quantize_is_an_error_not_a_float32_fallback(quantized, tmp_path, monkeypatch):
    c = _with_float32_export(quantized[0], tmp_path)

    def broken(*args, **kwargs):
        raise ValueError("unsupported node")
    monkeypatch.setattr("onnxruntime.quantization.quantize_dynamic", broken)
    with pytest.raises(ModelLoadError, match="quantization failed: ValueError: unsupported node"):
        embedders.load(c, Warnings())
    assert not Path(onnx_runtime.export_dir(c), "model.onnx").exists()


def test_a_damaged_int8_export_is_quantized_again(quantized, tmp_path):
    c = _with_float32_export(quantized[0], tmp_path)
    shutil.copytree(onnx_runtime.export_dir(quantized[0]), onnx_runtime.export_dir(c))
    model = Path(onnx_runtime.export_dir(c), "model.onnx")
    with open(model, "r+b") as fh:  # same size, still parses: only the digest can tell
        fh.seek(model.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    warn = Warnings()
    embedder = embedders.load(c, warn)
    assert warn.keys == {"onnx_export_damaged": 1}
    assert np.array_equal(embedder.encode(MIXED[:3]), quantized[1].encode(MIXED[:3]))  # the same int8 network


def test_preflight_refuses_int8_without_the_quantizer(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ModelLoadError, match="--backend onnx-int8 needs the onnx package"):
        models.preflight(make_config(root=str(tmp_path), backend="onnx-int8"))
    assert models.preflight(make_config(root=str(tmp_path), backend="onnx")).dim == 384  # float32 falls back instead


def test_int8_options():
    with pytest.raises(UsageError, match="--backend onnx-int8 runs on the CPU"):
        make_config(backend="onnx-int8", device="cuda")


def test_an_int8_export_that_cannot_be_made_refuses_before_the_reset(tmp_path):
    """No fallback means no lazy load: the export is made, or the run refused, before the collection
    of the old schema is touched."""
    shutil.copytree(REPO / "examples" / "corpus" / "guides", tmp_path / "corpus")
    base = ["--docs", "corpus", "--progress", "off"]
    assert run_cli(["build", *base, "--embed-model", "hash:16"], cwd=tmp_path).returncode == 0
    rows = collection_rows(tmp_path / ".chroma", "docs")
    latest = next(tmp_path.glob(".chroma-state/docs/LATEST")).read_bytes()
    refused = run_cli(["build", *base, "--backend", "onnx-int8"], cwd=tmp_path,
                      env={"CHROMA_RESUME_FAILPOINTS": "onnx.quantize:begin=raise"})
    assert refused.returncode == 2 and "--backend onnx-int8: cannot make the export" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert collection_rows(tmp_path / ".chroma", "docs") == rows
    assert next(tmp_path.glob(".chroma-state/docs/LATEST")).read_bytes() == latest


def test_an_int8_build_over_a_float32_index(tmp_path):
    """Switching to int8 is a schema change (refused under fail, a reset otherwise) that embeds every
    chunk again (no float32 cache entry serves it), verifies deep with its own vectors (a verify
    that forgets the option names it), and is then a no-op."""
    for name in ("rivers.md", "guides/write-ahead-logging.md", "zh/yuxie-rizhi.md"):
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "examples" / "corpus" / name, tmp_path / "corpus" / name)
    base = ["--docs", "corpus", "--progress", "off"]
    first = run_cli(["build", *base, "--backend", "torch"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    float_rows = collection_rows(tmp_path / ".chroma", "docs")
    refused = run_cli(["build", *base, "--backend", "onnx-int8", "--schema-change", "fail"], cwd=tmp_path)
    assert refused.returncode == 2 and "schema changed" in refused.stderr
    assert collection_rows(tmp_path / ".chroma", "docs") == float_rows
    switched = run_cli(["build", *base, "--backend", "onnx-int8"], cwd=tmp_path)
    assert switched.returncode == 0, switched.stderr
    done = summary(switched.stdout)
    assert (int(done["chunks_embedded"]), done["chunks_from_cache"]) == (len(float_rows), "0")
    int8_rows = collection_rows(tmp_path / ".chroma", "docs")
    assert sorted(int8_rows) == sorted(float_rows)
    cosines = [np.dot(vector, float_rows[i][2]) for i, (_, _, vector) in int8_rows.items()]
    assert onnx_runtime.INT8_MIN_COSINE - 1e-5 <= min(cosines) < 0.9999
    checked = run_cli(["verify", *base, "--backend", "onnx-int8", "--deep", "all"], cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # without the option the index was built with (the float32 manifest of the first build is still there)
    forgot = run_cli(["verify", *base], cwd=tmp_path)
    assert forgot.returncode == 1
    assert "was schema" in forgot.stdout and "with --backend onnx-int8 (given: auto)" in forgot.stdout
    again = run_cli(["build", *base, "--backend", "onnx-int8"], cwd=tmp_path)
    assert again.returncode == 0 and summary(again.stdout)["docs_processed"] == "0"
