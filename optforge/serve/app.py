"""The HTTP app: `POST /predict`, `GET /healthz`, `GET /metrics`, around one `DynamicBatcher`.

No torch here: the app gets a batch function `run_batch(texts) -> (results, timings)` (see
`optforge.serve.model.batch_function` for the one that runs a `Runnable`), so it can be tested with a
plain Python callable.

Request:   {"texts": ["...", ...]}  or  {"text": "..."}
Response:  {"predictions": [{"label": int, "label_name": str, "probabilities": [float, ...]}, ...]}
           or {"prediction": {...}} for "text"; the per-request time breakdown rides in the standard
           `Server-Timing` header (queue, tokenize, forward, postprocess, serialize, total; ms) and the
           sizes of the batches the texts ran in in `X-Batch-Size`.
Errors:    {"error": {"code": "...", "message": "..."}} with a 4xx status for bad input, 503 when the
           queue is full (with Retry-After), 500 when the model raised. No input can stop the server.
           A body that does not arrive within `body_timeout_s` is a 408 (and the connection closes).
           A client that goes away before its answer is counted as 499 (nginx's "client closed
           request"; nobody receives it), one whose body breaks HTTP framing as 400: client errors, not
           500s, and no traceback in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from optforge.serve.batcher import BatchFailed, BatchFn, Closed, DynamicBatcher, Overloaded
from optforge.serve.metrics import CONTENT_TYPE, ServerMetrics
from optforge.serve.options import DEFAULT_BODY_TIMEOUT_S, checked

JSON_TYPE = "application/json"
# scope["extensions"] key under which the server (serve/protocol.py) says a request's body broke HTTP
# framing (a malformed chunk) before the app sees the connection close
MALFORMED_BODY = "optforge.malformed_body"
PHASES = ("queue", "tokenize", "forward", "postprocess", "serialize")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # whole request body
    max_text_chars: int = 10_000  # one text (the model truncates at max_length tokens anyway)
    max_texts: int = 256  # texts in one request


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: Optional[dict] = None) -> Response:
    body = json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False)
    return Response(body, status_code=status, media_type=JSON_TYPE, headers=headers)


def parse_predict_body(body: bytes, limits: Limits) -> tuple[list[str], bool]:
    """(texts, single) from a /predict body, or ApiError naming what is wrong. Pure."""
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, "body_too_large", f"request body is {len(body)} bytes; the limit is "
                                              f"{limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_utf8", f"request body is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise ApiError(400, "invalid_json", 'empty body; send {"texts": ["..."]} or {"text": "..."}')
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {e.msg} at line {e.lineno} "
                                            f"column {e.colno}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid_request", f'expected a JSON object {{"texts": [...]}}, got '
                                               f"{_json_type(doc)}")
    unknown = sorted(set(doc) - {"text", "texts"})
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field {unknown[0]!r}; expected 'texts' or 'text'")
    if ("text" in doc) == ("texts" in doc):
        raise ApiError(422, "invalid_request", 'give exactly one of "texts" (a list of strings) or "text" '
                                               "(a string)")
    single = "text" in doc
    texts = [doc["text"]] if single else doc["texts"]
    if not isinstance(texts, list):
        raise ApiError(422, "invalid_request", f'"texts" must be a list of strings, got {_json_type(texts)}')
    if not texts:
        raise ApiError(422, "empty_texts", '"texts" is empty; send at least one text')
    if len(texts) > limits.max_texts:
        raise ApiError(422, "too_many_texts", f'"texts" has {len(texts)} items; the limit is '
                                              f"{limits.max_texts} per request")
    for i, t in enumerate(texts):
        where = '"text"' if single else f'"texts"[{i}]'
        if not isinstance(t, str):
            raise ApiError(422, "invalid_request", f"{where} must be a string, got {_json_type(t)}")
        if len(t) > limits.max_text_chars:
            raise ApiError(422, "text_too_long", f"{where} has {len(t)} characters; the limit is "
                                                 f"{limits.max_text_chars}")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, "invalid_text", f"{where} is not valid Unicode (a lone surrogate escape)") \
                from None
    return texts, single


def _json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(v), type(v).__name__)


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{k};dur={v:.3f}" for k, v in timings.items())


def parse_server_timing(header: str) -> dict[str, float]:
    """`queue;dur=1.2, forward;dur=3.4` -> {"queue": 1.2, "forward": 3.4} (what the load generator reads)."""
    out = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "dur" and name:
                try:
                    out[name] = float(v)
                except ValueError:
                    pass
    return out


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refusing (413) as soon as it is longer than `limit`: never buffers more than that; 408
    (closing the connection: the rest may never come) when it has not all arrived within `timeout_s`;
    400 when it broke HTTP framing, 499 when the client went away first."""
    try:
        return await asyncio.wait_for(_read_body(request, limit), timeout_s)
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s",
                       headers={"Connection": "close"}) from None
    except ClientDisconnect:
        malformed = request.scope.get("extensions", {}).get(MALFORMED_BODY)
        if malformed is not None:
            raise ApiError(400, "malformed_body", f"the request body broke HTTP framing: {malformed}") from None
        raise ApiError(499, "client_closed", "client closed the connection before sending the whole body") \
            from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid_request", "Content-Length is not a number")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _client_gone(receive) -> None:
    """Returns when the client disconnects (after the body was read, the server only sends this)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _CountRequests:
    """ASGI middleware: optforge_requests_total{path, code} for every response, errors included."""

    PATHS = ("/predict", "/healthz", "/metrics")

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        label = path if path in self.PATHS else "other"
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.inc(path=label, code=str(status["code"]))


def create_app(run_batch: BatchFn, *, max_batch: int = 32, max_wait_ms: float = 5.0,
               max_queue: Optional[int] = None, limits: Limits = Limits(), info: Optional[dict] = None,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S):
    """The ASGI app. `info` (config name, model description...) is shown by /healthz.
    `max_queue` (texts waiting) defaults to max(256, 8 * max_batch). An option out of its range
    (serve/options.py: `max_wait_ms=inf`...) is a ValueError."""
    max_wait_ms = checked("max_wait_ms", max_wait_ms)
    body_timeout_s = checked("body_timeout_s", body_timeout_s)
    max_queue = max_queue if max_queue is not None else max(256, 8 * max_batch)
    if limits.max_texts > max_queue:
        limits = Limits(limits.max_body_bytes, limits.max_text_chars, max_queue)
    batcher_box: dict = {}
    metrics = ServerMetrics(max_batch, queue_length=lambda: batcher_box["b"].pending if "b" in batcher_box else 0)

    def on_batch(size: int, run_ms: float, timings: dict) -> None:
        metrics.batches.observe(size)
        metrics.texts.inc(size)

    batcher = DynamicBatcher(run_batch, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             on_batch=on_batch)
    batcher_box["b"] = batcher

    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await read_body(request, limits.max_body_bytes, body_timeout_s)
            texts, single = parse_predict_body(body, limits)
        except ApiError as e:
            return error_response(e.status, e.code, e.message, headers=e.headers)
        submit = asyncio.ensure_future(batcher.submit(texts))
        gone = asyncio.ensure_future(_client_gone(request.receive))
        try:
            await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not submit.done():  # the client went away: free its queue slots, answer nobody
            submit.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await submit
            return error_response(499, "client_closed", "client closed the connection")
        try:
            outcome = submit.result()
        except Overloaded as e:
            return error_response(503, "overloaded", f"server overloaded: {e}; retry later",
                                  headers={"Retry-After": "1"})
        except Closed as e:
            return error_response(503, "shutting_down", str(e))
        except BatchFailed as e:
            return error_response(500, "model_error", f"the model failed on this batch: {e}")
        t_ser = time.perf_counter()
        body = {"prediction": outcome.results[0]} if single else {"predictions": outcome.results}
        payload = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        t_end = time.perf_counter()
        phases = {"queue": outcome.queue_ms, **outcome.timings, "serialize": (t_end - t_ser) * 1000.0,
                  "total": (t_end - t0) * 1000.0}
        metrics.latency.observe(t_end - t0)
        for name in PHASES:
            if name in phases:
                metrics.phase.observe(phases[name] / 1000.0, phase=name)
        headers = {"Server-Timing": server_timing(phases),
                   "X-Batch-Size": ",".join(str(b) for b in outcome.batch_sizes)}
        return Response(payload, media_type=JSON_TYPE, headers=headers)

    async def healthz(request: Request) -> Response:
        running = batcher.running
        body = {"status": "ok" if running else "starting", **(info or {}), "max_batch": max_batch,
                "max_wait_ms": max_wait_ms, "max_queue": max_queue, "queue": batcher.pending,
                "batches": batcher.batches}
        return Response(json.dumps(body, ensure_ascii=False), status_code=200 if running else 503,
                        media_type=JSON_TYPE)

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += " (endpoints: POST /predict, GET /healthz, GET /metrics)"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(middleware=[Middleware(_CountRequests, metrics=metrics)], routes=[Route("/predict", predict, methods=["POST"]),
                            Route("/healthz", healthz, methods=["GET"]),
                            Route("/metrics", metrics_page, methods=["GET"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error},
                    lifespan=lifespan)
    app.state.batcher = batcher
    app.state.metrics = metrics
    return app
