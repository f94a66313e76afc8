"""The HTTP app against a real uvicorn server on 127.0.0.1 (a free port, in a thread), with a real
Runnable on a tiny random-init BERT. Every request has a timeout; every polling loop a bound."""

from __future__ import annotations

import http.client
import json
import logging
import math
import re
import socket
import threading
import time

import pytest

from optforge.serve.app import Limits, create_app, parse_server_timing
from optforge.serve.model import batch_function
from optforge.serve.server import LOOPBACK, ServerThread

TIMEOUT_S = 20.0
LIMITS = Limits(max_body_bytes=32_000, max_text_chars=500, max_texts=16)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers (lower-case), body bytes) over a fresh connection to 127.0.0.1."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(port: int, body: bytes):
    return request(port, "POST", "/predict", body, {"Content-Type": "application/json"})


def error_code(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error"} and isinstance(doc["error"]["message"], str) and doc["error"]["message"]
    return doc["error"]["code"]


def wait_until(pred, what: str, bound_s: float = TIMEOUT_S):
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def healthz(port: int) -> dict:
    status, _, body = request(port, "GET", "/healthz")
    assert status == 200
    return json.loads(body)


@pytest.fixture(scope="module")
def server(tiny_runnable):
    app = create_app(batch_function(tiny_runnable), max_batch=8, max_wait_ms=2, limits=LIMITS,
                     info={"config": "tiny", "model": tiny_runnable.description})
    with ServerThread(app) as s:
        yield s


# --------------------------------------------------------------------------- good requests


def test_binds_to_loopback_with_a_tcp_socket(server):
    assert server.host == LOOPBACK
    # asyncio sets TCP_NODELAY only on sockets whose proto says TCP; without it every response waits
    # for the client's delayed ACK (~40 ms)
    assert server.sock.proto == socket.IPPROTO_TCP


def test_predict_many_texts_matches_the_runnable(server, tiny_runnable):
    texts = ["a gripping , funny film", "dull", "the second half drags on and on and on"]
    status, headers, body = post(server.port, json.dumps({"texts": texts}).encode())
    assert status == 200 and headers["content-type"].startswith("application/json")
    preds = json.loads(body)["predictions"]
    expected = tiny_runnable.predict(texts)
    assert len(preds) == 3
    for p, e in zip(preds, expected):
        assert p["label"] == e["label"] and p["label_name"] in ("neg", "pos")
        assert p["probabilities"] == pytest.approx(e["probabilities"], abs=1e-5)
        assert math.isclose(sum(p["probabilities"]), 1.0, abs_tol=1e-5)
    timing = parse_server_timing(headers["server-timing"])
    assert {"queue", "tokenize", "forward", "postprocess", "serialize", "total"} <= set(timing)
    assert all(v >= 0 for v in timing.values())
    assert headers["x-batch-size"].split(",")[0].isdigit()


def test_predict_one_text(server):
    status, _, body = post(server.port, json.dumps({"text": "wonderful ☀ naïve"}).encode())
    assert status == 200
    pred = json.loads(body)["prediction"]
    assert pred["label"] in (0, 1) and len(pred["probabilities"]) == 2


def test_concurrent_callers_get_their_own_answers(server, tiny_runnable):
    texts = [f"review number {i} " + "word " * (i % 7) for i in range(24)]
    expected = tiny_runnable.predict(texts)
    got: dict[int, dict] = {}

    def call(i):
        status, _, body = post(server.port, json.dumps({"text": texts[i]}).encode())
        got[i] = (status, json.loads(body))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert sorted(got) == list(range(len(texts)))
    for i, (status, doc) in got.items():
        assert status == 200
        assert doc["prediction"]["probabilities"] == pytest.approx(expected[i]["probabilities"], abs=1e-5)


def test_healthz(server):
    doc = healthz(server.port)
    assert doc["status"] == "ok" and doc["config"] == "tiny" and doc["max_batch"] == 8


# --------------------------------------------------------------------------- bad requests

BAD = [
    ("not json", b"{not json", 400, "invalid_json"),
    ("empty body", b"", 400, "invalid_json"),
    ("non-UTF-8", b'{"text": "caf\xe9"}', 400, "invalid_utf8"),
    ("deep nesting", b"[" * 20_000, 400, "invalid_json"),
    ("a list", b'["a", "b"]', 422, "invalid_request"),
    ("null", b"null", 422, "invalid_request"),
    ("texts a string", b'{"texts": "abc"}', 422, "invalid_request"),
    ("texts of numbers", b'{"texts": ["ok", 2]}', 422, "invalid_request"),
    ("text a number", b'{"text": 5}', 422, "invalid_request"),
    ("text null", b'{"text": null}', 422, "invalid_request"),
    ("both text and texts", b'{"text": "a", "texts": ["b"]}', 422, "invalid_request"),
    ("neither", b"{}", 422, "invalid_request"),
    ("unknown field", b'{"texts": ["a"], "lang": "en"}', 422, "invalid_request"),
    ("empty list", b'{"texts": []}', 422, "empty_texts"),
    ("text over the limit", json.dumps({"text": "x" * 501}).encode(), 422, "text_too_long"),
    ("too many texts", json.dumps({"texts": ["a"] * 17}).encode(), 422, "too_many_texts"),
    ("body over the limit", json.dumps({"texts": ["y" * 400] * 100}).encode(), 413, "body_too_large"),
    ("lone surrogate", b'{"text": "\\ud800"}', 422, "invalid_text"),
]


@pytest.mark.parametrize("body,status,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_lives(server, body, status, code):
    got_status, headers, got_body = post(server.port, body)
    assert (got_status, error_code(got_body)) == (status, code), got_body
    assert headers["content-type"].startswith("application/json")
    assert healthz(server.port)["status"] == "ok"
    assert post(server.port, b'{"text": "still here"}')[0] == 200


def test_unknown_path_and_method(server):
    status, _, body = request(server.port, "GET", "/nope")
    assert status == 404 and error_code(body) == "not_found"
    status, _, body = request(server.port, "GET", "/predict")
    assert status == 405 and error_code(body) == "method_not_allowed"


def test_a_lying_content_length_is_refused_before_the_body_is_read(server):
    with socket.create_connection((LOOPBACK, server.port), timeout=TIMEOUT_S) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999\r\n\r\n{")
        head = s.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413")


# --------------------------------------------------------------------------- /metrics

LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:\\.|[^"\\])*"'
SAMPLE = re.compile(rf'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{(?P<labels>{LABEL}(?:,{LABEL})*)\}})? '
                    r'(?P<value>-?[0-9.e+-]+|\+Inf|-Inf|NaN)$')


def parse_exposition(text: str) -> dict[str, list[tuple[str, dict, float]]]:
    """A strict reader of the Prometheus text format: {family: [(sample name, labels, value)]}."""
    families: dict[str, list] = {}
    types: dict[str, str] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in types
            types[name] = kind
            families[name] = []
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group("name")
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:\\.|[^"\\])*)"', m.group("labels") or ""))
        family = next(f for f in types if name == f or (types[f] == "histogram" and name in
                                                         (f + "_bucket", f + "_sum", f + "_count")))
        families[family].append((name, labels, float(m.group("value"))))
    for family, samples in families.items():
        if types[family] != "histogram":
            continue
        series: dict[tuple, list] = {}
        for name, labels, value in samples:
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            series.setdefault(key, []).append((name, labels, value))
        for key, rows in series.items():
            buckets = [v for n, lab, v in rows if n.endswith("_bucket")]
            assert buckets == sorted(buckets), f"{family}: buckets must be cumulative"
            les = [lab["le"] for n, lab, v in rows if n.endswith("_bucket")]
            assert les[-1] == "+Inf"
            count = next(v for n, lab, v in rows if n.endswith("_count"))
            assert buckets[-1] == count
    return families


def test_metrics_exposition_parses_and_counts(server):
    for _ in range(3):
        assert post(server.port, b'{"texts": ["one", "two"]}')[0] == 200
    post(server.port, b"{bad")
    status, headers, body = request(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    fam = parse_exposition(body.decode())
    reqs = {(lab["path"], lab["code"]): v for _, lab, v in fam["optforge_requests_total"]}
    assert reqs[("/predict", "200")] >= 3 and reqs[("/predict", "400")] >= 1
    batch_count = next(v for n, _, v in fam["optforge_batch_size"] if n.endswith("_count"))
    latency_count = next(v for n, _, v in fam["optforge_request_latency_seconds"] if n.endswith("_count"))
    assert batch_count >= 1 and latency_count >= 3
    phases = {lab["phase"] for n, lab, _ in fam["optforge_phase_seconds"]}
    assert {"queue", "tokenize", "forward", "serialize"} <= phases
    texts = fam["optforge_texts_total"][0][2]
    assert texts >= 6


# --------------------------------------------------------------------------- overload, disconnects, model errors


class GatedModel:
    """Wraps a real batch function: holds each batch until `gate` opens; "boom" raises."""

    def __init__(self, inner):
        self.inner = inner
        self.gate = threading.Event()
        self.started = threading.Event()
        self.seen: list[list[str]] = []

    def __call__(self, texts):
        self.seen.append(list(texts))
        self.started.set()
        if not self.gate.wait(TIMEOUT_S):
            raise RuntimeError("gate never opened")
        if "boom" in texts:
            raise RuntimeError("kernel exploded")
        return self.inner(texts)


@pytest.fixture
def gated(tiny_runnable):
    model = GatedModel(batch_function(tiny_runnable))
    app = create_app(model, max_batch=1, max_wait_ms=1, max_queue=2, limits=LIMITS)
    with ServerThread(app) as s:
        yield s, model
        model.gate.set()


def background_post(port: int, body: bytes, out: list) -> threading.Thread:
    t = threading.Thread(target=lambda: out.append(post(port, body)))
    t.start()
    return t


def test_overload_answers_503_at_once_and_recovers(gated):
    server, model = gated
    results: list = []
    threads = [background_post(server.port, b'{"text": "first"}', results)]
    wait_until(model.started.is_set, "the first batch to start")
    threads += [background_post(server.port, json.dumps({"text": f"queued {i}"}).encode(), results)
                for i in range(2)]
    wait_until(lambda: healthz(server.port)["queue"] == 2, "two queued requests")
    for _ in range(3):  # the model is still blocked, so these can only be answered by the bound
        status, headers, body = post(server.port, b'{"text": "one too many"}')
        assert status == 503 and error_code(body) == "overloaded" and headers.get("retry-after") == "1"
    model.gate.set()
    for t in threads:
        t.join(TIMEOUT_S)
    assert sorted(r[0] for r in results) == [200, 200, 200]
    assert post(server.port, b'{"text": "after the storm"}')[0] == 200
    metrics = request(server.port, "GET", "/metrics")[2].decode()
    assert 'optforge_requests_total{path="/predict",code="503"} 3' in metrics


def test_a_disconnected_caller_is_dropped_from_the_queue(gated):
    server, model = gated
    results: list = []
    first = background_post(server.port, b'{"text": "running"}', results)
    wait_until(model.started.is_set, "the first batch to start")
    body = b'{"text": "impatient"}'
    sock = socket.create_connection((LOOPBACK, server.port), timeout=TIMEOUT_S)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: healthz(server.port)["queue"] == 1, "the impatient request to queue")
    sock.close()
    wait_until(lambda: healthz(server.port)["queue"] == 0, "the impatient request to be dropped")
    model.gate.set()
    first.join(TIMEOUT_S)
    assert results[0][0] == 200
    assert post(server.port, b'{"text": "next"}')[0] == 200
    assert ["impatient"] not in model.seen


def test_a_model_error_is_a_500_and_the_server_lives(gated):
    server, model = gated
    model.gate.set()
    status, _, body = post(server.port, b'{"text": "boom"}')
    assert status == 500 and error_code(body) == "model_error" and "kernel exploded" in body.decode()
    assert post(server.port, b'{"text": "fine"}')[0] == 200


# --------------------------------------------------------------------------- slow and broken-off clients


def predict_counts(port: int) -> dict[str, float]:
    text = request(port, "GET", "/metrics")[2].decode()
    return {lab["code"]: v for _, lab, v in parse_exposition(text)["optforge_requests_total"]
            if lab["path"] == "/predict"}


def raw_exchange(port: int, data: bytes, then_close: bool) -> bytes:
    """Send `data` on a fresh connection; close at once, or read what the server answers until it closes."""
    with socket.create_connection((LOOPBACK, port), timeout=TIMEOUT_S) as s:
        s.sendall(data)
        if then_close:
            return b""
        chunks = []
        while len(chunks) < 100:
            chunk = s.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


HEAD = b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_a_body_that_stalls_is_answered_408_and_the_connection_closed(tiny_runnable):
    app = create_app(batch_function(tiny_runnable), max_batch=2, limits=LIMITS, body_timeout_s=0.5)
    with ServerThread(app) as server:
        t0 = time.monotonic()
        answer = raw_exchange(server.port, HEAD + b"Content-Length: 100\r\n\r\n" + b'{"text": "sta', False)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in answer, answer
        assert time.monotonic() - t0 < TIMEOUT_S  # raw_exchange read until the server closed
        wait_until(lambda: predict_counts(server.port).get("408") == 1, '/predict code="408" to count it')


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def server_log():
    """Every record uvicorn's error logger emits meanwhile (it does not propagate to the root)."""
    handler = Records()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


BROKEN_OFF = [
    ("disconnect mid-body", HEAD + b"Content-Length: 100\r\n\r\n" + b'{"text": "only a p', True, "499"),
    ("malformed chunk", HEAD + b"Transfer-Encoding: chunked\r\n\r\n4\r\n{\"te\r\nnot-a-size\r\n\r\n", False,
     "400"),
]


@pytest.mark.parametrize("data,then_close,code", [b[1:] for b in BROKEN_OFF], ids=[b[0] for b in BROKEN_OFF])
def test_a_client_that_breaks_off_is_a_client_error_without_a_traceback(server, server_log, data, then_close,
                                                                        code):
    before = predict_counts(server.port)
    answer = raw_exchange(server.port, data, then_close)
    if not then_close:
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    wait_until(lambda: predict_counts(server.port).get(code, 0) == before.get(code, 0) + 1,
               f'/predict code="{code}" to count it')
    after = predict_counts(server.port)
    assert after.get("500", 0) == before.get("500", 0)
    assert not [r for r in server_log if r.exc_info or r.levelno >= logging.ERROR], \
        [r.getMessage() for r in server_log]
    assert post(server.port, b'{"text": "still here"}')[0] == 200


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, -1.0, 10_001.0])
def test_max_wait_ms_must_be_finite_and_bounded(value):
    with pytest.raises(ValueError, match="max_wait_ms"):
        create_app(lambda texts: ([0] * len(texts), {}), max_wait_ms=value)


@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -1.0])
def test_body_timeout_must_be_finite_and_positive(value):
    with pytest.raises(ValueError, match="body_timeout_s"):
        create_app(lambda texts: ([0] * len(texts), {}), body_timeout_s=value)
