"""store's client side: which chromadb failures are retried (classified on the exceptions chromadb
really raises), the retry window, the per-request timeout, request sizes, and auth headers."""
from __future__ import annotations

import http.server
import threading
import time

import chromadb
import httpx
import numpy as np
import pytest

from chromadb.api.base_http_client import BaseHTTPClient
from chromadb.api.types import pack_embedding_safely

from chroma_resume import config as cfg
from chroma_resume import store
from chroma_resume.errors import RuntimeFailure, UsageError
from test_server import CHROMA, ChromaServer, free_port, server  # noqa: F401 (server is a fixture)

pytestmark = pytest.mark.timeout(120)


def raised(call) -> Exception:
    """The exception `call` raises (the test fails if it returns)."""
    with pytest.raises(Exception) as info:
        call()
    return info.value


class Calls:
    """Wraps a call and counts attempts, to prove what was (not) retried."""

    def __init__(self, call):
        self.call, self.count = call, 0

    def __call__(self):
        self.count += 1
        return self.call()


def server_config(port: int, **options) -> cfg.Config:
    return cfg.make_config(chroma_host="127.0.0.1", chroma_port=port, **options)


# ---- classification on real chromadb exceptions -----------------------------------------------

@pytest.fixture
def embedded(tmp_path):
    """A real embedded client and its collection, holding one 2-dimensional vector."""
    chroma = chromadb.PersistentClient(path=str(tmp_path / "db"))
    collection = chroma.get_or_create_collection("unit", embedding_function=None)
    collection.upsert(ids=["a"], embeddings=[[1.0, 2.0]], documents=["a"])
    return chroma, collection


@pytest.mark.parametrize("label, make_call, type_name, expected", [
    ("duplicate id in one upsert", lambda db: lambda: db[1].upsert(ids=["x", "x"], embeddings=[[1.0, 2.0]] * 2),
     "DuplicateIDError", UsageError),
    ("wrong dimension", lambda db: lambda: db[1].upsert(ids=["y"], embeddings=[[1.0, 2.0, 3.0]]),
     "InvalidArgumentError", UsageError),
    ("metadata chromadb rejects", lambda db: lambda: db[1].upsert(ids=["z"], embeddings=[[1.0, 2.0]],
                                                              metadatas=[{"k": [1, "a"]}]),
     "ValueError", UsageError),
    ("collection deleted under the run", lambda db: lambda: db[0].get_collection("gone"),
     "NotFoundError", RuntimeFailure),
])
def test_errors_no_retry_can_fix_stop_at_once(embedded, capsys, label, make_call, type_name, expected):
    call = make_call(embedded)
    exc = raised(call)
    assert type(exc).__name__ == type_name, label
    assert not store._transient(exc)
    counted = Calls(call)
    with pytest.raises(expected) as info:
        store._retry(store.Endpoint("/some/db", retry_for=30), "upsert", counted)
    assert type(info.value) is expected and counted.count == 1
    assert str(info.value).startswith(f"Chroma at /some/db: upsert refused, not retried: {type_name}: ")
    assert "[WAIT]" not in capsys.readouterr().err


def test_chromadb_reports_a_closed_port_as_a_value_error_from_a_connect_error():
    exc = raised(lambda: chromadb.HttpClient(host="127.0.0.1", port=free_port()))
    assert type(exc) is ValueError and "Could not connect to a Chroma server" in str(exc)
    assert isinstance(exc.__context__, httpx.ConnectError)
    assert store._transient(exc)
    assert not store._transient(ValueError("Expected IDs to be unique"))


def test_a_closed_port_is_retried_for_the_window_then_exit_5(capsys):
    port = free_port()
    counted = Calls(lambda: chromadb.HttpClient(host="127.0.0.1", port=port))
    started = time.monotonic()
    with pytest.raises(RuntimeFailure) as info:
        store._retry(store.Endpoint(f"http://127.0.0.1:{port}", retry_for=1.5), "connect", counted)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 6 and counted.count >= 4  # doubling pauses 0.25, 0.5, 1 (cut to the window)
    assert info.value.exit_code == 5
    assert f"Chroma at http://127.0.0.1:{port} unreachable: connect still failing after {counted.count}" \
        in str(info.value) and "Connection refused" in str(info.value)
    err = capsys.readouterr().err
    assert err.count("[WAIT]") == 1 and "retrying for up to 1.5s" in err


def test_a_failure_then_success_returns_the_result(capsys):
    answers = iter([httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), "ok"])

    def flaky():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert store._retry(store.Endpoint("http://h:1", retry_for=10), "count", flaky) == "ok"
    assert capsys.readouterr().err.count("[WAIT]") == 1


# ---- against a real server ----------------------------------------------------------------------

def test_client_sets_the_request_timeout_and_a_hung_server_times_out(server):
    c = server_config(server.port, chroma_timeout=1, retry_for=1)
    chroma, where = store.client(c)
    assert where == server.url and where.retry_for == 1
    assert chroma._server._session.timeout == httpx.Timeout(1)
    collection = chroma.get_or_create_collection("hung", embedding_function=None)
    server.pause()
    try:
        started = time.monotonic()
        exc = raised(collection.count)
        assert isinstance(exc, httpx.ReadTimeout) and time.monotonic() - started < 5
        assert store._transient(exc)
        with pytest.raises(RuntimeFailure, match="ReadTimeout"):
            store._retry(where, "count", collection.count)
    finally:
        server.pause(False)
    assert collection.count() == 0  # the same client works once the server answers again


def test_tenant_or_database_that_does_not_exist_is_a_usage_error(server, tmp_path):
    with pytest.raises(UsageError, match=r"connect refused, not retried: NotFoundError: Database \[nosuch\]"):
        store.client(server_config(server.port, chroma_database="nosuch", retry_for=30))
    with pytest.raises(UsageError, match=r"NotFoundError: Tenant \[nosuch\] not found"):
        store.client(server_config(server.port, chroma_tenant="nosuch", retry_for=30))
    with pytest.raises(UsageError, match=r"open refused, not retried: NotFoundError: Database \[nosuch\]"):
        store.client(cfg.make_config(root=str(tmp_path), chroma_database="nosuch"))


def test_5xx_is_retried_4xx_is_not(tmp_path):
    """chromadb turns an HTTP error whose body is not a Chroma error into a bare Exception whose
    context is the httpx.HTTPStatusError: the status code decides."""
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(int(self.path.rsplit("/", 1)[-1]))
            self.end_headers()
            self.wfile.write(b"nope")

        def log_message(self, *args):
            pass

    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        session = httpx.Client()
        for status, transient in ((503, True), (500, True), (429, True), (400, False), (413, False)):
            def call():
                response = session.get(f"http://127.0.0.1:{stub.server_address[1]}/{status}")
                BaseHTTPClient._raise_chroma_error(response)
            exc = raised(call)
            assert type(exc) is Exception and isinstance(exc.__context__, httpx.HTTPStatusError)
            assert store._transient(exc) is transient, status
    finally:
        stub.shutdown()
        stub.server_close()


@pytest.fixture
def small_server(tmp_path):
    """A real server refusing requests over 10 MB (its default is 40 MB): room for our 8 MiB."""
    if not CHROMA.exists():
        pytest.skip("chroma CLI not installed")
    srv = ChromaServer(tmp_path / "small-data", max_payload=10_000_000).start()
    yield srv
    srv.kill()


def test_a_large_1024_dim_batch_goes_through_in_requests_under_the_byte_limit(small_server):
    n, dim = 2000, 1024
    rng = np.random.default_rng(7)
    embeddings = rng.random((n, dim), dtype=np.float32)
    words = np.array("alpha beta gamma delta epsilon river stone cloud harbor lantern".split())
    documents = [" ".join(rng.choice(words, 400)) for _ in range(n)]  # about 2,400 characters each
    ids = [f"row{i:05d}" for i in range(n)]
    metadatas = [{"doc_id": f"d{i}", "chunk_index": i} for i in range(n)]
    chroma, where = store.client(server_config(small_server.port, retry_for=5))
    collection = chroma.get_or_create_collection("large", embedding_function=None)
    db = store.Store(chroma, collection, where)
    assert n <= db.max_batch  # rows alone would send one request ...

    too_big = raised(lambda: collection.upsert(ids=ids, embeddings=embeddings, documents=documents,
                                               metadatas=metadatas))
    assert "Payload too large" in str(too_big) and too_big.__context__.response.status_code == 413  # ... refused
    assert not store._transient(too_big)

    db.upsert(ids, embeddings, documents, metadatas)
    assert collection.count() == n
    got = collection.get(ids=[ids[0], ids[-1]], include=["embeddings", "documents"])
    assert got["documents"] == [documents[0], documents[-1]]
    assert np.array_equal(np.asarray(got["embeddings"], dtype=np.float32), embeddings[[0, -1]])


def test_spans_respect_rows_and_bytes():
    assert list(store._spans([10] * 7, max_rows=3, max_bytes=1000)) == [(0, 3), (3, 6), (6, 7)]
    assert list(store._spans([400, 400, 400, 100], max_rows=10, max_bytes=1000)) == [(0, 2), (2, 4)]
    assert list(store._spans([5000, 10, 10], max_rows=10, max_bytes=1000)) == [(0, 1), (1, 3)]  # alone
    assert list(store._spans([], max_rows=10, max_bytes=1000)) == []


def test_row_estimate_covers_the_wire_size():
    """base64 of float32 is 4/3 x 4 bytes per dimension; the estimate must not be below it."""
    vector = np.ones(1024, dtype=np.float32)
    estimate = store._row_bytes("id", vector, "é" * 100, {"k": "v"})
    wire = len(pack_embedding_safely(vector)) + len("é".encode()) * 100
    assert estimate >= wire


# ---- headers from the environment ---------------------------------------------------------------

def headers(monkeypatch, value: str | None) -> dict[str, str]:
    if value is None:
        monkeypatch.delenv("CR_UNIT_HEADERS", raising=False)
    else:
        monkeypatch.setenv("CR_UNIT_HEADERS", value)
    return store.request_headers(server_config(1, chroma_headers_env="CR_UNIT_HEADERS"))


def test_headers_token_or_json(monkeypatch):
    assert headers(monkeypatch, "  tok-123\n") == {"Authorization": "Bearer tok-123"}
    assert headers(monkeypatch, '{"X-Chroma-Token": "t", "X-Team": "s"}') == {"X-Chroma-Token": "t", "X-Team": "s"}
    assert store.request_headers(server_config(1)) == {}


@pytest.mark.parametrize("value, says", [
    (None, "environment variable CR_UNIT_HEADERS is not set"),
    ('{"Authorization": "Bearer hunter2"', "CR_UNIT_HEADERS is not valid JSON"),
    ('{"X-Key": 42, "X-Other": "hunter2"}', "CR_UNIT_HEADERS must map header names to string values"),
    ("hunter2 with spaces", "CR_UNIT_HEADERS must hold a JSON object of headers or one token"),
    ("   ", "CR_UNIT_HEADERS must hold"),
])
def test_bad_headers_variable_is_exit_2_naming_it_never_its_value(monkeypatch, value, says):
    with pytest.raises(UsageError) as info:
        headers(monkeypatch, value)
    assert info.value.exit_code == 2 and says in str(info.value)
    assert "hunter2" not in str(info.value)
