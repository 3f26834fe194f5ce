"""Against a real `chroma run` server on 127.0.0.1: build, server dies mid-run, resume after restart."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, summary, write_corpus

pytestmark = pytest.mark.timeout(240)

CHROMA = Path(sys.executable).with_name("chroma")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(CHROMA), "run", "--path", str(data), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # bounded wait for the port to accept connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, "chroma run exited"
            time.sleep(0.2)
    stop_server(proc)
    pytest.fail("chroma server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.skipif(shutil.which(str(CHROMA)) is None, reason="chroma CLI not installed")
def test_server_dying_mid_run_exits_5_keeps_the_wal_and_resumes(tmp_path):
    write_corpus(tmp_path / "corpus", 30, seed=11)
    port = free_port()
    opts = ["--docs", "corpus", "--collection", "srv", "--embed-model", "hash:32", "--upsert-batch", "16",
            "--chroma-host", "127.0.0.1", "--chroma-port", str(port), "--progress", "off"]
    server = start_server(tmp_path / "data", port)
    try:
        trace = tmp_path / "trace.txt"
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "CHROMA_RESUME_FAILPOINTS": f"trace={trace};store.after_upsert@2=sleep(3000)"}
        build = subprocess.Popen([sys.executable, "-m", "chroma_resume", "build", *opts], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while "store.after_upsert" not in (trace.read_text() if trace.exists() else "").replace(
                "store.after_upsert:", "", 1):  # the second upsert returned; the build now pauses
            assert time.monotonic() < deadline and build.poll() is None
            time.sleep(0.05)
        stop_server(server)
        out, err = build.communicate(timeout=120)
        assert build.returncode == 5, err
        assert f"127.0.0.1:{port}" in err and "failed after" in err
        wal_file = next((tmp_path / ".chroma-state" / "srv").glob("*/index_state.stage.jsonl"))
        records = [json.loads(line) for line in wal_file.read_bytes().splitlines()]
        committed = sum(r["t"] == "DOC_COMMITTED" for r in records)
        assert committed > 0 and records[-1]["t"] == "RUN_FINISH" and records[-1]["reason"] == "error"

        server = start_server(tmp_path / "data", port)
        resumed = run_cli(["build", *opts], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert "resume_active=true" in resumed.stdout
        assert summary(resumed.stdout)["docs_resumed_skipped"] == str(committed)
        verify = run_cli(["verify", *opts], cwd=tmp_path)
        assert verify.returncode == 0, verify.stdout
    finally:
        stop_server(server)


def test_unreachable_server_fails_fast_with_the_cause(tmp_path):
    write_corpus(tmp_path / "corpus", 2)
    port = free_port()
    result = run_cli(["build", "--docs", "corpus", "--collection", "srv", "--embed-model", "hash:8",
                      "--chroma-host", "127.0.0.1", "--chroma-port", str(port)], cwd=tmp_path)
    assert result.returncode == 5 and f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
