"""Precision is a tolerance, not an identity (issue 22).

float32 (torch or the checked ONNX export), fp16 on CUDA and bfloat16 on a CPU are one schema: one
fingerprint, one collection, one embedding cache, one verify --deep. A reduced precision is used only
after its probe check passed on this kind of machine (recorded in the state root), else float32 after
a WARN. --backend auto picks the fastest checked path; --backend torch stays float32.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import msgspec
import numpy as np
import pytest

from chroma_resume import cli, embedders, executor, models, schema
from chroma_resume.config import make_config
from chroma_resume.embedders import probe, select, torch_runtime
from chroma_resume.errors import ModelLoadError, UsageError
from chroma_resume.reporting import Warnings
from conftest import REPO, collection_rows, run_cli, summary
from test_embedding import MIXED

pytestmark = pytest.mark.timeout(300)

# Computed by the code before issue 22 (precision was then part of the fingerprint) for the packaged
# default model in float32. Pinned because an index built in float32 must keep its fingerprint across
# the upgrade: any change here resets every existing index and empties its cache on the next build.
# (If the default model's package ships other files, these change for that reason, rightly.)
FLOAT32_FINGERPRINT = "bert@b587133624a3eb74"
FLOAT32_SCHEMA = "a635868d1a56d19d"
FLOAT32_MAX_LENGTH_128 = "bert@469d00006ab8e7a4"
INT8_FINGERPRINT = "bert@4de2fbf6ffb07aec"  # int8 stays a schema of its own, also unchanged


def test_a_float32_index_keeps_its_fingerprint_and_precisions_share_it(tmp_path):
    c = make_config(root=str(tmp_path))
    for options in ({}, {"backend": "torch"}, {"backend": "onnx"}, {"backend": "torch-bf16"},
                    {"device": "cuda"}, {"device": "cuda:1", "fp16": "on"}, {"device": "cuda", "fp16": "off"}):
        same = msgspec.structs.replace(c, **options)
        assert (models.model_fingerprint(same), schema.schema_hash(same)) == (FLOAT32_FINGERPRINT, FLOAT32_SCHEMA)
    assert models.model_fingerprint(msgspec.structs.replace(c, max_length=128)) == FLOAT32_MAX_LENGTH_128
    assert models.model_fingerprint(msgspec.structs.replace(c, backend="onnx-int8")) == INT8_FINGERPRINT


def test_a_cuda_schema_and_choice_are_decided_without_torch(tmp_path):
    """No GPU here: the fingerprint, the schema and the choice (fp16) for --device cuda come from the
    options alone, so a CPU machine can tell that a GPU-built index is its own schema."""
    code = ("import sys\nfrom chroma_resume import embedders, schema\nfrom chroma_resume.config import make_config\n"
            f"c = make_config(root={str(tmp_path)!r}, device='cuda')\n"
            "print(schema.schema_hash(c), embedders.choose(c).precision, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [FLOAT32_SCHEMA, "fp16", "False"]


# ---- what auto picks ------------------------------------------------------------------------------

@pytest.mark.parametrize("options, evidence, expected", [
    ({}, "avx512_bf16", ("torch", "bf16")),
    ({}, None, ("onnx", "float32")),  # float32: the checked export where one exists, else torch
    ({"fp16": "off"}, "amx_bf16", ("onnx", "float32")),
    ({"device": "cuda"}, None, ("torch", "fp16")),
    ({"device": "cuda", "fp16": "off"}, None, ("torch", "float32")),
    ({"backend": "torch"}, "avx512_bf16", ("torch", "float32")),  # the reference stays float32
    ({"backend": "torch", "device": "cuda"}, None, ("torch", "float32")),
    ({"backend": "torch", "device": "cuda", "fp16": "on"}, None, ("torch", "fp16")),
    ({"backend": "torch-bf16"}, None, ("torch", "bf16")),
    ({"backend": "onnx"}, "avx512_bf16", ("onnx", "float32")),
    ({"backend": "onnx-int8"}, "avx512_bf16", ("onnx-int8", "int8")),
    ({"embed_model": "hash:8"}, "avx512_bf16", ("hash", "float32")),
])
def test_auto_is_the_fastest_checked_path(monkeypatch, options, evidence, expected):
    monkeypatch.setattr(select, "bf16_evidence", lambda: evidence)
    choice = embedders.choose(make_config(**options))
    assert (choice.runtime, choice.precision) == expected


def test_the_config_line_names_what_runs_and_why(tmp_path, monkeypatch):
    c = make_config(root=str(tmp_path), docs="corpus")
    monkeypatch.setattr(select, "bf16_evidence", lambda: None)
    assert "runs=onnx/float32 (no bfloat16 units on this CPU" in cli.describe(c)
    monkeypatch.setattr(select, "bf16_evidence", lambda: "avx512_bf16")
    assert "runs=torch/bf16 (this CPU computes bfloat16 (avx512_bf16)" in cli.describe(c)


@pytest.mark.parametrize("flags, evidence", [("fpu sse avx512f avx512_vnni", None), ("fpu avx512f amx_bf16 amx_tile",
                                             "amx_bf16"), ("fpu avx512_bf16", "avx512_bf16")])
def test_bf16_evidence_is_read_from_the_cpus_flags(tmp_path, monkeypatch, flags, evidence):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    monkeypatch.setattr(select, "CPU_INFO", str(tmp_path / "cpuinfo"))
    assert select.bf16_evidence() == evidence
    assert select.machine_kind("cpu").startswith("cpu Some CPU [")
    c = make_config(root=str(tmp_path), backend="torch-bf16")
    warn = Warnings()
    select.prepare(c, warn)  # asked for bf16 where it is emulated: said before the build
    assert warn.keys == ({} if evidence else {"bf16_not_native": 1})
    warn = Warnings()
    select.prepare(msgspec.structs.replace(c, backend="torch"), warn)  # float32: no claim to make
    assert warn.keys == {}


def test_bf16_runs_on_the_cpu_only():
    with pytest.raises(UsageError, match="--backend torch-bf16 runs on the CPU"):
        make_config(backend="torch-bf16", device="cuda")


# ---- the probe check -----------------------------------------------------------------------------

def test_bf16_vectors_are_close_to_float32_but_not_equal(tmp_path):
    c = make_config(root=str(tmp_path), embed_batch=4, backend="torch-bf16")
    (tmp_path / ".chroma-state").mkdir()  # a build's; without it the check is made and not recorded
    warn = Warnings()
    bf16 = embedders.load(c, warn)
    float32 = embedders.load(msgspec.structs.replace(c, backend="torch"))
    assert isinstance(bf16, embedders.FlagEmbedder) and (bf16.precision, float32.precision) == ("bf16", "float32")
    assert warn.count == 0 and bf16.embedded == 0  # the probes are not counted as the build's work
    assert not (tmp_path / ".chroma-state" / "onnx").exists()  # no ONNX export
    got, want = bf16.encode(MIXED), float32.encode(MIXED)
    assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    cosines = np.einsum("ij,ij->i", got.astype(np.float64), want.astype(np.float64))
    assert cosines.min() >= 0.999 and cosines.min() < 0.9999999  # bfloat16 really ran, and stayed close
    (check,) = probe.read_records(c).values()
    assert check.passed and check.worst_cosine >= probe.PRECISION_MIN_COSINE and check.probes == len(probe.PROBES)


def test_a_precision_below_the_tolerance_is_refused_and_its_record_reused(tmp_path, monkeypatch):
    """A planted bf16 path whose vectors drift (each rolled by one dimension): refused, WARNed with the
    worst cosine, float32 runs; the next load reads the record and embeds no probe again."""
    texts_by_precision = {"float32": 0, "bf16": 0}
    real_encode = torch_runtime.FlagEmbedder.encode

    def planted(self, texts):
        texts_by_precision[self.precision] += len(texts)
        vectors = real_encode(self, texts)
        return np.roll(vectors, 1, axis=1) if self.precision == "bf16" else vectors

    monkeypatch.setattr(torch_runtime.FlagEmbedder, "encode", planted)
    c = make_config(root=str(tmp_path), embed_batch=4, backend="torch-bf16")
    (tmp_path / ".chroma-state").mkdir()
    for attempt in range(2):
        warn = Warnings()
        embedder = embedders.load(c, warn)
        assert embedder.precision == "float32" and warn.keys == {"precision_refused": 1}
        embedder.encode(["a text"])
        probes = 2 + len(probe.PROBES)  # a warm-up of two, then the timed pass, each way, by the first load only
        assert texts_by_precision == {"float32": probes + attempt + 1, "bf16": probes}, attempt
    (check,) = probe.read_records(c).values()
    assert not check.passed and check.worst_cosine < probe.PRECISION_MIN_COSINE
    records = json.loads((tmp_path / ".chroma-state" / probe.RECORD_NAME).read_text())
    assert list(records) == [probe.check_key(c, "bf16", select.machine_kind("cpu"))]


def test_auto_keeps_float32_where_the_reduced_precision_is_not_faster(tmp_path, monkeypatch):
    """bfloat16 without AMX can be slower than float32 (measured on a Xeon with avx512_bf16): auto takes
    a reduced precision only where its probe pass was faster; --backend torch-bf16 still gets bf16."""
    monkeypatch.setattr(select, "bf16_evidence", lambda: "avx512_bf16")
    real_timed = probe.timed_encode
    timed = []

    def planted_speed(embedder):  # the real vectors; bf16 said to take twice float32's time
        timed.append(embedder.precision)
        return real_timed(embedder)[0], 2.0 if embedder.precision == "bf16" else 1.0

    monkeypatch.setattr(probe, "timed_encode", planted_speed)
    c = make_config(root=str(tmp_path), docs="corpus", embed_batch=4)
    (tmp_path / ".chroma-state").mkdir()
    before = cli.describe(c)  # not measured yet: the [CONFIG] line says the check decides
    assert "runs=torch/bf16" in before and "if its probe check" in before and "else float32" in before
    for attempt, warned in enumerate(({"precision_not_faster": 1}, {})):
        warn = Warnings()
        assert embedders.load(c, warn).precision == "float32" and warn.keys == warned, attempt
        assert timed == ["float32", "bf16"]  # measured once; the second load reads the record, loads no bf16
    (check,) = probe.read_records(c).values()
    assert check.passed and not check.faster and (check.float32_sec, check.reduced_sec) == (1.0, 2.0)
    assert "runs=onnx/float32 (bf16 took 2.00x float32's time" in cli.describe(c)
    assert embedders.load(msgspec.structs.replace(c, backend="torch-bf16")).precision == "bf16"


# ---- one index across precisions -------------------------------------------------------------------

def _rows_by_text(root) -> dict[str, list]:
    return {text: vector for text, _, vector in collection_rows(root / ".chroma", "docs").values()}


@pytest.mark.timeout(600)  # five processes that each load torch and the model, on shared cores
def test_an_index_moves_between_bf16_and_float32_without_a_reset(tmp_path):
    for name in ("rivers.md", "guides/write-ahead-logging.md"):
        (tmp_path / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "examples" / "corpus" / name, tmp_path / "corpus" / name)
    edited = tmp_path / "corpus" / "guides" / "write-ahead-logging.md"
    common = ["--docs", "corpus", "--progress", "off", "--schema-change", "fail"]
    built = run_cli(["build", *common, "--backend", "torch-bf16"], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert int(summary(built.stdout)["chunks_embedded"]) == len(_rows_by_text(tmp_path)) >= 5
    for step, backend in enumerate(("torch", "torch-bf16")):
        before = _rows_by_text(tmp_path)
        edited.write_text(edited.read_text() + f"\n\nA closing note, edit {step}: the log is the truth.\n")
        done = run_cli(["build", *common, "--backend", backend], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "schema" not in done.stderr  # no reset: one schema across precisions
        after, got = _rows_by_text(tmp_path), summary(done.stdout)
        new_texts = set(after) - set(before)
        assert got["docs_processed"] == "1" and int(got["chunks_embedded"]) == len(new_texts) >= 1
        assert int(got["chunks_from_cache"]) >= 3  # the edited document's unchanged chunks: cached vectors
        for text in set(after) & set(before):
            assert after[text] == before[text]
        # every vector, of either precision, re-embedded in this step's precision and compared
        checked = run_cli(["verify", "--docs", "corpus", "--backend", backend, "--deep", "all"], cwd=tmp_path)
        assert checked.returncode == 0 and "[PASS] embedding" in checked.stdout, checked.stdout + checked.stderr


# ---- Ray workers ---------------------------------------------------------------------------------

def test_ray_workers_report_their_precision_and_differing_ones_serve_one_build(tmp_path):
    """The actor body, run in this process (no Ray needed): a bf16 worker says so; the writer accepts a
    worker in fp16 and one in float32 of the same model, and still refuses another model."""
    c = make_config(root=str(tmp_path), embed_batch=4, backend="torch-bf16")
    worker = executor.EmbedWorker(msgspec.json.encode(c))
    identity = worker.who()
    assert (identity.fingerprint, identity.dim, identity.precision) == (FLOAT32_FINGERPRINT, 384, "bf16")
    gpu = executor.Identity(FLOAT32_FINGERPRINT, 384, "gpu-node", "fp16")
    cpu = executor.Identity(FLOAT32_FINGERPRINT, 384, "cpu-node", "float32")
    dim = executor.checked(identity, models.model_fingerprint(c), None)
    assert executor.checked(gpu, FLOAT32_FINGERPRINT, dim) == executor.checked(cpu, FLOAT32_FINGERPRINT, dim) == 384
    with pytest.raises(ModelLoadError, match="install the same model"):
        executor.checked(executor.Identity(INT8_FINGERPRINT, 384, "int8-node", "int8"), FLOAT32_FINGERPRINT, dim)
