"""The ONNX Runtime backend: exported once per model fingerprint, used only after the probe check
against torch passed, same vectors as a torch build, cache shared across backends, no-op untouched."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from chroma_resume import embedders, failpoints, models
from chroma_resume.embedders import onnx_runtime, select
from chroma_resume.config import make_config
from chroma_resume.errors import ModelLoadError, UsageError
from chroma_resume.reporting import Warnings
from conftest import REPO, collection_rows, summary
from test_embedding import MIXED

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export and check of the default model under a fresh state root: (config, embedder, warnings)."""
    c = make_config(root=str(tmp_path_factory.mktemp("onnx")), embed_batch=4, backend="onnx")
    warn = Warnings()
    return c, embedders.load(c, warn), warn


@pytest.fixture
def no_bf16_units(monkeypatch):
    """A CPU without bfloat16 units, where --backend auto runs float32 (ONNX where exported)."""
    monkeypatch.setattr(select, "bf16_evidence", lambda: None)


def test_auto_never_exports_and_uses_an_export_once_one_exists(tmp_path, exported, no_bf16_units):
    fresh = make_config(root=str(tmp_path), embed_batch=4)
    assert fresh.backend == "auto"
    assert isinstance(embedders.load(fresh), embedders.FlagEmbedder)
    assert not Path(onnx_runtime.export_dir(fresh)).exists()  # no export paid for implicitly
    c, _, _ = exported
    again = embedders.load(msgspec.structs.replace(c, backend="auto"))
    assert isinstance(again, onnx_runtime.OnnxEmbedder)


def test_backend_onnx_on_a_cpu_is_the_checked_export(exported):
    c, embedder, warn = exported
    assert isinstance(embedder, onnx_runtime.OnnxEmbedder) and warn.count == 0
    folder = Path(onnx_runtime.export_dir(c))
    assert folder.parent == Path(c.root) / ".chroma-state" / "onnx"  # beside embed-cache.sqlite3
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.onnx", "tokenizer.json"]
    meta = onnx_runtime.read_meta(str(folder), models.model_fingerprint(c))
    assert meta.passed and meta.worst_cosine >= onnx_runtime.PROBE_MIN_COSINE
    assert (meta.dim, meta.max_length, meta.padding_side) == (384, 256, "right")
    assert {"onnxruntime", "torch", "transformers"} <= set(meta.versions)
    assert (embedder.dim, embedder.name, embedder.embedded) == (384, c.embed_model, 0)


def test_onnx_vectors_and_tokens_equal_flagembeddings(exported):
    c, embedder, _ = exported
    reference = embedders.load_torch(msgspec.structs.replace(c, backend="torch"))
    got, want = embedder.encode(MIXED), reference.encode(MIXED)
    assert got.dtype == np.float32 and got.shape == want.shape == (len(MIXED), 384)
    assert np.einsum("ij,ij->i", got, want).min() >= onnx_runtime.PROBE_MIN_COSINE
    assert embedder.embedded == len(MIXED) and embedder.encode([]).shape == (0, 384)
    ours = [e.ids for e in embedder.tokenizer.encode_batch(MIXED)]
    assert ours == reference.flag.tokenizer(MIXED, truncation=True, max_length=256)["input_ids"]
    assert max(map(len, ours)) == 256  # the long probe really is cut at the max length


def test_a_second_load_reuses_the_export_without_torch(exported, tmp_path):
    c, _, _ = exported
    code = ("import sys\nfrom chroma_resume import embedders\nfrom chroma_resume.embedders import onnx_runtime, select\n"
            "from chroma_resume.config import make_config\n"
            "select.bf16_evidence = lambda: None  # a CPU without bfloat16 units: auto is float32\n"
            f"c = make_config(root={c.root!r})\n"
            "onnx_runtime._export_and_check = None  # a second export would fail here\n"
            "e = embedders.load(c)\nprint(type(e).__name__, e.encode(['a text', '一段文字']).shape)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'FlagEmbedding') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["OnnxEmbedder (2, 384)", "[]"]


def test_what_invalidates_a_stored_export(exported, tmp_path):
    c, _, _ = exported
    folder, fingerprint = onnx_runtime.export_dir(c), models.model_fingerprint(c)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert onnx_runtime.read_meta(str(copy), fingerprint) is not None
    assert onnx_runtime.read_meta(str(copy), fingerprint + "x") is None  # another model, pooling or max length
    meta = msgspec.json.decode((copy / "meta.json").read_bytes())
    (copy / "meta.json").write_bytes(msgspec.json.encode({**meta, "runtime": "0.1"}))  # another onnxruntime
    assert onnx_runtime.read_meta(str(copy), fingerprint) is None
    (copy / "meta.json").write_bytes(msgspec.json.encode(meta))
    with open(copy / "model.onnx", "r+b") as fh:  # a torn copy of the model
        fh.truncate(1000)
    assert onnx_runtime.read_meta(str(copy), fingerprint) is None
    assert onnx_runtime.export_dir(msgspec.structs.replace(c, max_length=128)) != folder
    assert onnx_runtime.export_dir(msgspec.structs.replace(c, pooling="cls")) != folder


def _damage_in_place(path: Path) -> None:
    """A megabyte of the weights zeroed: the file keeps its size and still parses."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size * 2 // 3)
        fh.write(b"\0" * (1 << 20))
    assert path.stat().st_size == size


def test_a_damaged_export_is_noticed_and_made_again(exported, tmp_path, no_bf16_units):
    source, _, _ = exported
    c = make_config(root=str(tmp_path), embed_batch=4, backend="onnx")
    folder = Path(onnx_runtime.export_dir(c))
    shutil.copytree(onnx_runtime.export_dir(source), folder)
    _damage_in_place(folder / "model.onnx")
    warn = Warnings()
    auto = embedders.load(msgspec.structs.replace(c, backend="auto"), warn)  # auto never exports: torch
    assert isinstance(auto, embedders.FlagEmbedder) and warn.keys == {"onnx_export_damaged": 1}
    again = embedders.load(c, warn)  # --backend onnx exports again
    assert isinstance(again, onnx_runtime.OnnxEmbedder) and warn.keys == {"onnx_export_damaged": 2}
    meta = onnx_runtime.read_meta(str(folder), models.model_fingerprint(c))
    assert meta.passed and meta.sha256["model.onnx"] == onnx_runtime._sha256(str(folder / "model.onnx"))


def test_the_export_lock_sweeps_what_a_killed_export_left(tmp_path):
    folder = tmp_path / "onnx" / "model.v2"
    folder.mkdir(parents=True)
    for name in ("model.onnx.tmp.4242", "meta.json.tmp.77"):
        (folder / name).write_bytes(b"half an export")
    (folder / "model.onnx").write_bytes(b"kept")
    with onnx_runtime.export_lock(str(folder)):
        assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]


def test_a_planted_mismatch_fails_the_check_and_the_build_keeps_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(failpoints, "_active", True)
    monkeypatch.setattr(failpoints, "_points", {("bug.onnx_probe_mismatch", None): (None, "on", 0)})
    c = make_config(root=str(tmp_path), backend="onnx")
    warn = Warnings()
    first = embedders.load(c, warn)
    assert isinstance(first, embedders.FlagEmbedder) and warn.keys == {"onnx_backend_unused": 1}
    meta = onnx_runtime.read_meta(onnx_runtime.export_dir(c), models.model_fingerprint(c))
    assert not meta.passed and meta.worst_cosine < 0.9 and "probe check" in meta.cause
    monkeypatch.setattr(onnx_runtime, "_export_and_check", None)  # the failed check is remembered
    again = embedders.load(c, warn)
    assert isinstance(again, embedders.FlagEmbedder) and warn.keys == {"onnx_backend_unused": 2}


def test_an_unwritable_export_folder_warns_and_keeps_torch(tmp_path):
    (tmp_path / ".chroma-state").mkdir()
    (tmp_path / ".chroma-state" / "onnx").write_text("a file where the export folder should be")
    warn = Warnings()
    embedder = embedders.load(make_config(root=str(tmp_path), backend="onnx"), warn)
    assert isinstance(embedder, embedders.FlagEmbedder) and warn.keys == {"onnx_backend_unused": 1}
    assert embedder.encode(["still embedded"]).shape == (1, 384)


def test_a_gpu_build_keeps_torch(tmp_path):
    """auto on --device cuda goes straight to torch: here (no CUDA) torch's refusal, and no export."""
    c = make_config(root=str(tmp_path), device="cuda")
    with pytest.raises(ModelLoadError, match="torch sees 0 CUDA device"):
        embedders.load(c, Warnings())
    assert not (tmp_path / ".chroma-state").exists()


def test_backend_options():
    assert make_config().backend == "auto"
    with pytest.raises(UsageError, match="--backend onnx runs on the CPU"):
        make_config(backend="onnx", device="cuda")
    with pytest.raises(UsageError, match="backend"):
        make_config(backend="tensorrt")


# ---- whole builds --------------------------------------------------------------------

def _corpus(root: Path) -> None:
    for name in ("zh/xiangliang-jiansuo.md", "zh/yuxie-rizhi.md", "guides/write-ahead-logging.md", "rivers.md"):
        (root / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "examples" / "corpus" / name, root / "corpus" / name)


def _build(root: Path, name: str, *extra: str, env: dict | None = None, python: tuple[str, ...] = ()):
    args = ["build", "--docs", "corpus", "--collection", name, "--db", f"db-{name}", "--progress", "off", *extra]
    return subprocess.Popen([sys.executable, *python, "-m", "chroma_resume", *args], cwd=root, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    return summary(out), err


def _events(trace: Path) -> list[str]:
    return [line for line in trace.read_text().splitlines() if line.startswith("onnx.")] if trace.exists() else []


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two onnx builds started together while the export lock is held here, then a torch build."""
    root = tmp_path_factory.mktemp("builds")
    _corpus(root)
    trace = root / "trace.log"
    c = make_config(root=str(root))
    env = {"CHROMA_RESUME_FAILPOINTS": f"trace={trace}"}
    with onnx_runtime.export_lock(onnx_runtime.export_dir(c)):
        procs = [_build(root, name, "--backend", "onnx", env=env) for name in ("onnx-a", "onnx-b")]
        deadline = time.monotonic() + 120
        while _events(trace).count("onnx.export:wait") < 2:
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "no build reached the lock"
            time.sleep(0.05)
    results = [_finish(p) for p in procs]
    torch = _finish(_build(root, "torch", "--backend", "torch", "--state-root", "state-torch"))
    return root, trace, results, torch


def test_two_builds_wait_for_one_export(builds):
    _, trace, results, _ = builds
    assert sorted(_events(trace)) == ["onnx.export:begin", "onnx.export:done", "onnx.export:wait", "onnx.export:wait"]
    assert all(s["chunks_embedded"] != "0" and "WARN" not in err for s, err in results)


def test_an_onnx_build_equals_a_torch_build(builds):
    root, _, _, (torch_summary, _) = builds
    onnx_rows = collection_rows(root / "db-onnx-a", "onnx-a")
    torch_rows = collection_rows(root / "db-torch", "torch")
    assert int(torch_summary["chunks_embedded"]) == len(torch_rows) > 10
    assert sorted(onnx_rows) == sorted(torch_rows)
    for i, (text, meta, vector) in torch_rows.items():
        assert onnx_rows[i][:2] == (text, meta)
        assert np.dot(vector, onnx_rows[i][2]) >= onnx_runtime.PROBE_MIN_COSINE - 1e-5  # rows are rounded to 1e-6


def test_cached_vectors_serve_either_backend(builds):
    root, *_ = builds
    for backend, state_root in (("torch", ".chroma-state"), ("onnx", "state-torch")):
        done = _finish(_build(root, f"from-{backend}", "--backend", backend, "--state-root", state_root))[0]
        assert (done["chunks_embedded"], done["chunks_from_cache"]) == ("0", done["expected_chunks"])


def test_later_builds_load_no_torch_and_a_no_op_no_onnx(builds):
    root, *_ = builds
    # --fp16 off: auto in float32, as on a CPU without bfloat16 units
    fresh = _build(root, "again", "--embed-cache", "off", "--fp16", "off", python=("-X", "importtime"))
    done, err = _finish(fresh)
    assert int(done["chunks_embedded"]) > 10
    imported = set(re.findall(r"^import time:.*\|\s*([\w.]+)$", err, re.M))
    assert "onnxruntime" in imported and not imported & {"torch", "transformers", "FlagEmbedding"}
    noop = _build(root, "again", "--embed-cache", "off", "--fp16", "off", python=("-X", "importtime"))
    done, err = _finish(noop)
    assert done["docs_processed"] == "0"
    imported = set(re.findall(r"^import time:.*\|\s*([\w.]+)$", err, re.M))
    assert not imported & {"onnxruntime", "onnx", "tokenizers", "torch", "transformers"}
