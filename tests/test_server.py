"""Against a real `chroma run` server on 127.0.0.1: the server dies mid-build and comes back (within
--retry-for: the build waits and finishes; after it: exit 5 and the rerun resumes), a server that is
down or never answers, and auth headers reaching the server.

Timing is never guessed: a failpoint pauses the build after its 2nd upsert, the test waits for that
pause in the failpoint trace, kills the server (SIGKILL) and restarts it on the same port and path.
"""
from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import run_cli, summary, write_corpus

pytestmark = pytest.mark.timeout(240)

CHROMA = Path(sys.executable).with_name("chroma")
SECRET = "s3cret-token-4711"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ChromaServer:
    """A `chroma run` on a loopback port; restartable on the same port and path; stopped by pid.
    `max_payload` (bytes) starts it from a config file with a lower request-size limit."""

    def __init__(self, data: Path, max_payload: int | None = None):
        self.data, self.port, self.max_payload = data, free_port(), max_payload
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ChromaServer":
        self.proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self._beats():
            if self.proc.poll() is not None:
                pytest.fail(f"chroma run exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail("chroma run gave no heartbeat within 60 s")
            time.sleep(0.1)
        return self

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to finish anything, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            os.kill(self.proc.pid, signal.SIGCONT)  # in case a test paused it
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def pause(self, paused: bool = True) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers (a hung server)."""
        os.kill(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def _command(self) -> list[str]:
        if self.max_payload is None:
            return [str(CHROMA), "run", "--path", str(self.data), "--host", "127.0.0.1", "--port", str(self.port)]
        config = self.data.with_suffix(".yaml")
        config.write_text(f'persist_path: "{self.data}"\nlisten_address: "127.0.0.1"\nport: {self.port}\n'
                          f"max_payload_size_bytes: {self.max_payload}\n")
        return [str(CHROMA), "run", str(config)]

    def _beats(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/heartbeat", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False


@pytest.fixture
def server(tmp_path):
    if not CHROMA.exists():
        pytest.skip("chroma CLI not installed")
    srv = ChromaServer(tmp_path / "server-data").start()
    yield srv
    srv.kill()


def build_args(port: int, *extra: str) -> list[str]:
    return ["build", "--docs", "corpus", "--collection", "srv", "--embed-model", "hash:32", "--upsert-batch", "16",
            "--progress", "off", "--chroma-host", "127.0.0.1", "--chroma-port", str(port), *extra]


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the build exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def paused_build(root: Path, args: list[str]) -> tuple[subprocess.Popen, Path, Path]:
    """A build that sleeps 4 s after its 2nd upsert; returns it, its failpoint trace and its stderr file."""
    trace, err = root / "trace.txt", root / "build.err"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "CHROMA_RESUME_FAILPOINTS": f"trace={trace};store.after_upsert@2=sleep(4000)"}
    with open(root / "build.out", "w") as out_fh, open(err, "w") as err_fh:
        proc = subprocess.Popen([sys.executable, "-m", "chroma_resume", *args], cwd=root, env=env,
                                stdout=out_fh, stderr=err_fh)
    return proc, trace, err


def upserts_done(trace: Path) -> int:
    return trace.read_text().count("store.after_upsert:") if trace.exists() else 0


_READ_SERVER_ROWS = """
import json, sys, chromadb
got = chromadb.HttpClient(host="127.0.0.1", port=int(sys.argv[1])).get_collection(sys.argv[2]).get(
    include=["documents", "metadatas", "embeddings"])
rows = {i: [d, m, [round(float(x), 6) for x in e]]
        for i, d, m, e in zip(got["ids"], got["documents"], got["metadatas"], got["embeddings"])}
print(json.dumps(rows, sort_keys=True))
"""

_READ_DB_ROWS = _READ_SERVER_ROWS.replace('HttpClient(host="127.0.0.1", port=int(sys.argv[1]))',
                                          "PersistentClient(path=sys.argv[1])")


def rows(script: str, where: str, name: str) -> dict:
    """id -> [document, metadata, embedding], read in a fresh process (no client state shared)."""
    out = subprocess.run([sys.executable, "-c", script, where, name], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out)


def assert_same_as_clean_build(root: Path, server: ChromaServer) -> None:
    """The collection on the server equals what an uninterrupted build writes: the same ids,
    documents and metadata, and the same vectors up to float32 rounding (the HTTP and the embedded
    client convert float64 to float32 on different paths)."""
    clean = run_cli(["build", "--docs", "corpus", "--collection", "srv", "--embed-model", "hash:32",
                     "--progress", "off", "--db", "clean-db", "--state-root", "clean-state"], cwd=root)
    assert clean.returncode == 0, clean.stderr
    expected = rows(_READ_DB_ROWS, str(root / "clean-db"), "srv")
    got = rows(_READ_SERVER_ROWS, str(server.port), "srv")
    assert len(expected) > 16 * 2
    assert {i: row[:2] for i, row in got.items()} == {i: row[:2] for i, row in expected.items()}
    assert all(max(abs(a - b) for a, b in zip(got[i][2], expected[i][2])) < 1e-5 for i in got)


def test_build_waits_for_a_restarted_server_and_finishes(tmp_path, server):
    write_corpus(tmp_path / "corpus", 30, seed=11)
    build, trace, err = paused_build(tmp_path, build_args(server.port, "--retry-for", "60"))
    try:
        wait_for(lambda: upserts_done(trace) >= 2, build, "pause after the 2nd upsert")
        server.kill()
        wait_for(lambda: "[WAIT]" in err.read_text(), build, "[WAIT] line: the build retrying the dead server")
        server.start()
        assert build.wait(timeout=120) == 0, err.read_text()
    finally:
        if build.poll() is None:
            build.kill()
    waits = [line for line in err.read_text().splitlines() if line.startswith("[WAIT]")]
    assert len(waits) == 1 and f"Chroma at {server.url} unreachable" in waits[0] and "up to 60s" in waits[0]
    assert upserts_done(trace) > 2  # the build went on writing after the server came back
    assert_same_as_clean_build(tmp_path, server)
    deep = run_cli(["verify", *build_args(server.port)[1:], "--deep", "all"], cwd=tmp_path)
    assert deep.returncode == 0, deep.stdout + deep.stderr
    assert "[PASS] embedding" in deep.stdout and "[PASS] findable" in deep.stdout


def test_server_down_past_retry_for_exits_5_and_the_rerun_resumes(tmp_path, server):
    write_corpus(tmp_path / "corpus", 30, seed=11)
    args = build_args(server.port, "--retry-for", "2")
    build, trace, err = paused_build(tmp_path, args)
    try:
        wait_for(lambda: upserts_done(trace) >= 2, build, "pause after the 2nd upsert")
        server.kill()
        assert build.wait(timeout=120) == 5, err.read_text()
    finally:
        if build.poll() is None:
            build.kill()
    message = err.read_text()
    assert f"Chroma at {server.url} unreachable" in message and "ConnectError" in message
    assert "Traceback" not in message
    wal_file = next((tmp_path / ".chroma-state" / "srv").glob("*/index_state.stage.jsonl"))
    records = [json.loads(line) for line in wal_file.read_bytes().splitlines()]
    committed = sum(r["t"] == "DOC_COMMITTED" for r in records)
    assert committed > 0 and records[-1]["t"] == "RUN_FINISH" and records[-1]["reason"] == "error"

    server.start()
    resumed = run_cli(args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume_active=true" in resumed.stdout
    assert summary(resumed.stdout)["docs_resumed_skipped"] == str(committed)
    assert_same_as_clean_build(tmp_path, server)


def test_unreachable_server_exits_5_once_retry_for_has_passed(tmp_path):
    write_corpus(tmp_path / "corpus", 2)
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = run_cli(build_args(port, "--retry-for", "2"), cwd=tmp_path, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 5, result.stderr
    url = f"http://127.0.0.1:{port}"
    waits = [line for line in result.stderr.splitlines() if line.startswith("[WAIT]")]
    assert waits == [f"[WAIT] Chroma at {url} unreachable (ConnectError: [Errno 111] Connection refused); "
                     "retrying for up to 2s"]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: Chroma at {url} unreachable: connect still failing after ")
    assert int(re.search(r"after (\d+) attempts", error)[1]) >= 4  # 0.25 + 0.5 + 1 s of pauses fit in 2 s
    assert 2 <= elapsed < 30  # bounded by --retry-for (the default is 60 s), plus interpreter start
    assert "Traceback" not in result.stderr


def test_a_server_that_never_answers_times_out(tmp_path):
    """A port that accepts connections and never answers: without --chroma-timeout this would hang."""
    write_corpus(tmp_path / "corpus", 2)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        started = time.monotonic()
        result = run_cli(build_args(hung.getsockname()[1], "--chroma-timeout", "1", "--retry-for", "2"),
                         cwd=tmp_path, timeout=60)
        elapsed = time.monotonic() - started
    assert result.returncode == 5, result.stderr
    assert "ReadTimeout" in result.stderr.splitlines()[-1]
    assert elapsed < 30


@contextlib.contextmanager
def recording_proxy(upstream_port: int):
    """A loopback HTTP proxy to the server that records every request's method, path and headers."""
    seen: list[tuple[str, str, dict[str, str]]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            upstream.request(self.command, self.path, body=body, headers={
                k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")})
            answer = upstream.getresponse()
            data = answer.read()
            self.send_response(answer.status)
            for key, value in answer.getheaders():
                if key.lower() not in ("connection", "content-length", "transfer-encoding"):
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            upstream.close()

        do_GET = do_POST = do_PUT = do_DELETE = forward

        def log_message(self, *args):
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        proxy.seen = seen
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("value, expected", [
    (SECRET, {"authorization": f"Bearer {SECRET}"}),
    (json.dumps({"X-Chroma-Token": SECRET, "X-Team": "search"}), {"x-chroma-token": SECRET, "x-team": "search"}),
])
def test_headers_from_the_named_variable_reach_the_server(tmp_path, server, value, expected):
    """`chroma run` in chromadb 1.5.9 is the Rust server, whose open-source build authenticates nobody
    (its auth hook is a no-op) and the Python server that honoured CHROMA_SERVER_AUTHN_PROVIDER needs
    fastapi, which is not installed. So a recording proxy in front of the real server checks that
    every request carries the headers, through a whole build."""
    write_corpus(tmp_path / "corpus", 6)
    with recording_proxy(server.port) as proxy:
        result = run_cli(build_args(proxy.server_address[1], "--chroma-headers-env", "CR_TEST_HEADERS"),
                         cwd=tmp_path, env={"CR_TEST_HEADERS": value})
    assert result.returncode == 0, result.stderr
    assert any(path.endswith("/upsert") for _, path, _ in proxy.seen)
    missing = [(method, path) for method, path, headers in proxy.seen
               if {k: headers.get(k) for k in expected} != expected]
    assert not missing and proxy.seen
    assert SECRET not in result.stdout + result.stderr
