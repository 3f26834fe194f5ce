"""The Ray executor: builds the same index as the local one, survives a killed worker and a killed
driver with nothing embedded twice, and the local path never imports Ray.

One local Ray (2 CPUs) is started for the whole module by this process; every build is the real
CLI in a subprocess, connected to it with --ray-address.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from chroma_resume import executor
from chroma_resume.errors import ModelLoadError
from conftest import HASH_BUILD, collection_rows, run_cli, write_corpus

pytestmark = pytest.mark.timeout(240)
ray = pytest.importorskip("ray", reason="the Ray executor's tests need the ray extra")

DOCS = 24
HASH = [*HASH_BUILD, "--upsert-batch", "8", "--embed-log", "embedded.log"]


@pytest.fixture(scope="module")
def cluster() -> str:
    """The address of a local Ray with 2 CPUs, shared by the module's tests (the variables ray.init sets
    in this process, which the builds inherit to join it, are undone afterwards)."""
    environ = dict(os.environ)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus") / "corpus"
    write_corpus(folder, DOCS, seed=7)
    return folder


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory, corpus: Path) -> dict:
    """The index the local executor builds from the corpus (stand-in embedder), vectors as stored."""
    root = _copy(corpus, tmp_path_factory.mktemp("local"))
    result = run_cli(["build", *HASH], cwd=root)
    assert result.returncode == 0, result.stderr
    return collection_rows(root / ".chroma", "test", digits=None)


def _copy(corpus: Path, root: Path) -> Path:
    shutil.copytree(corpus, root / "corpus")
    return root


def ray_build(root: Path, address: str, *extra: str, fail: str | None = None):
    env = {"CHROMA_RESUME_FAILPOINTS": fail} if fail else None
    return run_cli(["build", *HASH, "--executor", "ray", "--ray-address", address, "--ray-workers", "2",
                    "--ray-cpus-per-worker", "0.5", *extra], cwd=root, env=env)


def embedded(root: Path) -> list[str]:
    log = root / "embedded.log"
    return log.read_text().split() if log.exists() else []


def test_ray_build_equals_local_build(tmp_path, cluster, corpus, local_rows):
    root = _copy(corpus, tmp_path)
    result = ray_build(root, cluster)
    assert result.returncode == 0, result.stderr
    assert collection_rows(root / ".chroma", "test", digits=None) == local_rows  # ids, texts, metadata, vectors
    assert sorted(embedded(root)) == sorted(local_rows)  # each chunk embedded once


def test_killed_worker_is_replaced_and_nothing_is_embedded_twice(tmp_path, cluster, corpus, local_rows):
    root = _copy(corpus, tmp_path)
    # After the first batch comes back, the actor holding the most batches is killed (ray.kill).
    result = ray_build(root, cluster, fail="executor.returned@1=on")
    assert result.returncode == 0, result.stderr
    assert "key=embed_worker_lost" in result.stderr
    assert collection_rows(root / ".chroma", "test", digits=None) == local_rows
    ids = embedded(root)
    assert sorted(ids) == sorted(local_rows) and not [i for i, n in Counter(ids).items() if n > 1]


def test_killed_driver_resumes_from_the_wal(tmp_path, cluster, corpus, local_rows):
    root = _copy(corpus, tmp_path)
    crashed = ray_build(root, cluster, fail="wal.after_append:DOC_COMMITTED@6=kill")
    assert crashed.returncode == -9
    before = embedded(root)
    assert 0 < len(before) < len(local_rows)
    result = ray_build(root, cluster)
    assert result.returncode == 0, result.stderr
    assert "resume_active=true" in result.stdout
    assert collection_rows(root / ".chroma", "test", digits=None) == local_rows
    ids = embedded(root)  # both runs: what came back before the kill was cached, never computed again
    assert sorted(ids) == sorted(local_rows) and len(ids) == len(set(ids))


def test_real_model_on_ray_equals_local(tmp_path, cluster):
    write_corpus(tmp_path / "corpus", 4, seed=1)
    # float32 on both sides: auto's bf16 is taken by a timed probe check recorded per state root, and
    # the two state roots here may time it differently (tests/test_precision.py covers mixed precisions)
    args = ["build", "--docs", "corpus", "--collection", "real", "--progress", "off", "--fp16", "off"]
    local = run_cli([*args, "--db", "local.db", "--state-root", "local.state"], cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    remote = run_cli([*args, "--db", "ray.db", "--state-root", "ray.state", "--executor", "ray",
                      "--ray-address", cluster], cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr
    want, got = (collection_rows(tmp_path / db, "real", digits=None) for db in ("local.db", "ray.db"))
    assert want.keys() == got.keys() and len(want) > 4
    assert all(want[i][:2] == got[i][:2] for i in want)
    gap = max(np.abs(np.array(want[i][2]) - np.array(got[i][2])).max() for i in want)
    assert gap <= 1e-6, gap


def test_a_worker_that_cannot_load_the_model_is_exit_2(tmp_path, cluster, corpus):
    root = _copy(corpus, tmp_path)
    (root / "broken-model").mkdir()
    # The weights are whole (a safetensors file whose header and size agree), the tokenizer is missing: the
    # preflight builds the tokenizer, so the driver refuses before any worker starts or anything is reset.
    (root / "broken-model" / "config.json").write_text(
        '{"model_type": "bert", "hidden_size": 8, "max_position_embeddings": 16}')
    header = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (root / "broken-model" / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    result = ray_build(root, cluster, "--embed-model", "broken-model", "--ray-workers", "1")
    assert result.returncode == 2, result.stderr
    assert "no tokenizer can be built" in result.stderr and "broken-model" in result.stderr


def test_workers_that_together_need_more_cpus_than_the_cluster_has_are_exit_2(workdir, cluster):
    """5 workers of 0.5 CPU on a 2-CPU cluster: the fifth actor would wait for a CPU forever."""
    result = ray_build(workdir, cluster, "--ray-workers", "5", "--ray-cpus-per-worker", "0.5")
    assert result.returncode == 2, result.stderr
    assert "--ray-workers 5 --ray-cpus-per-worker 0.5" in result.stderr and "2 CPUs" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["corpus"]


def test_more_gpus_per_worker_than_the_cluster_has_is_exit_2(workdir, cluster):
    result = ray_build(workdir, cluster, "--device", "cuda", "--ray-gpus-per-worker", "1")
    assert result.returncode == 2, result.stderr
    assert "--ray-gpus-per-worker 1: the Ray cluster has 0 GPUs in all" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["corpus"]


# ---- no cluster needed -------------------------------------------------------------------

def test_more_batches_in_flight_locally_write_the_same_index(tmp_path, corpus, local_rows):
    root = _copy(corpus, tmp_path)
    result = run_cli(["build", *HASH, "--max-batches-in-flight", "3"], cwd=root)
    assert result.returncode == 0, result.stderr
    assert collection_rows(root / ".chroma", "test", digits=None) == local_rows


def test_local_path_never_imports_ray(workdir):
    check = ("import sys; from chroma_resume.cli import main; rc = main(sys.argv[1:]); "
             "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(rc)")
    result = _python(workdir, check, "build", *HASH)
    assert result.returncode == 0, result.stderr


def test_ray_executor_without_ray_is_exit_2_naming_the_extra(workdir):
    check = "import sys; sys.modules['ray'] = None; from chroma_resume.cli import main; sys.exit(main(sys.argv[1:]))"
    result = _python(workdir, check, "build", *HASH, "--executor", "ray")
    assert result.returncode == 2
    assert "chroma-resume[ray]" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["corpus"]  # nothing written


def test_unreachable_cluster_is_exit_5_before_anything_is_written(workdir):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_cli(["build", *HASH, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"], cwd=workdir)
    assert result.returncode == 5, result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["corpus"]


def test_a_worker_with_another_model_or_dimension_is_refused():
    me = executor.Identity("hash:32", 32, "node-a")
    assert executor.checked(me, "hash:32", None) == 32
    with pytest.raises(ModelLoadError, match="node-b computes vectors with model other@1"):
        executor.checked(executor.Identity("other@1", 32, "node-b"), "hash:32", 32)
    with pytest.raises(ModelLoadError, match="64-d vectors, the others 32-d"):
        executor.checked(executor.Identity("hash:32", 64, "node-c"), "hash:32", 32)


def _python(cwd: Path, code: str, *argv: str):
    env = {k: v for k, v in os.environ.items() if k != "CHROMA_RESUME_FAILPOINTS"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_wait_on_an_actor_honours_the_stop_signal_and_its_bound(monkeypatch):
    """ray.get on an actor no node can place never returns: the wait polls, stops at SIGTERM's flag
    (exit 130, nothing written) and gives up after its bound (exit 5)."""
    from chroma_resume.config import make_config
    from chroma_resume.errors import Interrupted, RuntimeFailure

    pool = object.__new__(executor.RayExecutor)
    pool.ray, pool.c = ray, make_config(docs="corpus", executor="ray", ray_workers=5, ray_cpus_per_worker=0.5)
    calls = []

    def never(ref, timeout=None):
        calls.append(timeout)
        raise ray.exceptions.GetTimeoutError("still pending")

    monkeypatch.setattr(ray, "get", never)
    monkeypatch.setattr(executor, "WAIT_POLL", 0.01)
    stops = iter([False, False, True])
    pool.should_stop = lambda: next(stops)
    with pytest.raises(Interrupted, match="waiting for a Ray worker to start"):
        pool.wait("ref", 60.0, "a Ray worker to start")
    assert len(calls) == 3 and all(t is not None for t in calls)  # never an unbounded ray.get
    pool.should_stop = lambda: False
    with pytest.raises(RuntimeFailure, match="--ray-workers 5, --ray-cpus-per-worker 0.5"):
        pool.wait("ref", 0.05, "a Ray worker to start")
