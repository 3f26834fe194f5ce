"""--backend torch-bf16: torch with bfloat16 matrix products on the CPU. Its vectors differ from the
float32 ones (slightly), so it is a model identity of its own: a schema change, its own cache entries."""
from __future__ import annotations

import shutil

import msgspec
import numpy as np
import pytest

from chroma_resume import embedding, models, schema
from chroma_resume.config import make_config
from chroma_resume.errors import UsageError
from chroma_resume.reporting import Warnings
from conftest import REPO, collection_rows, run_cli, summary
from test_embedding import MIXED

pytestmark = pytest.mark.timeout(300)


def test_bf16_is_a_model_identity_of_its_own(tmp_path):
    c = make_config(root=str(tmp_path), backend="torch-bf16")
    torch32 = msgspec.structs.replace(c, backend="torch")
    assert models.model_fingerprint(c) != models.model_fingerprint(torch32)
    assert schema.schema_hash(c) != schema.schema_hash(torch32)
    with pytest.raises(UsageError, match="--backend torch-bf16 runs on the CPU"):
        make_config(backend="torch-bf16", device="cuda")


def test_a_cpu_without_bf16_units_is_warned_before_the_build(tmp_path, monkeypatch):
    c = make_config(root=str(tmp_path), backend="torch-bf16")
    for flags, warned in (("fpu sse avx512f avx512_vnni", {"bf16_not_native": 1}),
                          ("fpu avx512f amx_bf16 amx_tile", {}), ("fpu avx512_bf16", {})):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(embedding, "CPU_INFO", str(tmp_path / "cpuinfo"))
        warn = Warnings()
        embedding.prepare(c, warn)
        assert warn.keys == warned, flags
    warn = Warnings()
    embedding.prepare(msgspec.structs.replace(c, backend="torch"), warn)  # float32: no claim to make
    assert warn.keys == {}


def test_bf16_vectors_are_close_to_float32_but_not_equal(tmp_path):
    c = make_config(root=str(tmp_path), embed_batch=4, backend="torch-bf16")
    bf16 = embedding.load(c)
    float32 = embedding.load(msgspec.structs.replace(c, backend="torch"))
    assert isinstance(bf16, embedding.FlagEmbedder) and not (tmp_path / ".chroma-state").exists()  # no ONNX export
    got, want = bf16.encode(MIXED), float32.encode(MIXED)
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    cosines = np.einsum("ij,ij->i", got.astype(np.float64), want.astype(np.float64))
    assert cosines.min() >= 0.999 and cosines.min() < 0.9999999  # bfloat16 really ran, and stayed close


def test_a_bf16_build_verifies_with_its_own_vectors(tmp_path):
    for name in ("rivers.md", "zh/yuxie-rizhi.md"):
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "examples" / "corpus" / name, tmp_path / "corpus" / name)
    base = ["--docs", "corpus", "--progress", "off", "--backend", "torch-bf16"]
    built = run_cli(["build", *base], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    rows = collection_rows(tmp_path / ".chroma", "docs")
    assert int(summary(built.stdout)["chunks_embedded"]) == len(rows) >= 3
    checked = run_cli(["verify", *base, "--deep", "all"], cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    float32 = run_cli(["build", "--docs", "corpus", "--progress", "off", "--backend", "torch",
                       "--schema-change", "fail"], cwd=tmp_path)
    assert float32.returncode == 2 and "schema changed" in float32.stderr
