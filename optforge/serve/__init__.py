"""Serving a built configuration over HTTP, and measuring it.

- `batcher`: a pure-asyncio dynamic batcher (no torch): callers' texts are grouped for at most
  `max_wait_ms` into batches of at most `max_batch`, one batch runs at a time in a worker thread.
- `metrics`: Prometheus text exposition (counters and histograms), pure.
- `app`: the Starlette app (`/predict`, `/healthz`, `/metrics`) around a batcher; input validation.
- `server`: uvicorn on a loopback socket, in a thread or as `python -m optforge.serve.server`.
- `loadgen`: an open-loop Poisson load generator with its own tiny HTTP/1.1 client (loopback only).
- `choose`: which configuration "best" serves (the report's verdicts), for the command and the stage.
- `launch`: what `optforge serve` runs -- resolves a built configuration's artifact from the cache.
"""
