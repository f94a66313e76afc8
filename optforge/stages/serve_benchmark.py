"""serve_benchmark: serve one configuration over HTTP on 127.0.0.1 and measure it under open-loop
Poisson load, with batching off (max_batch 1) and on (params.max_batch).

The server runs as a child process (`python -m optforge.serve.server`), so the load generator in this
process never competes with it for a GIL -- only for cores, as a real client on the same host would.
Per offered rate: achieved throughput, p50/p90/p99 latency from the *scheduled* send time, and the
mean per-request breakdown (queue / tokenize / forward / postprocess / serialize, from the server's
Server-Timing header, plus what happened outside the server). A rate meets the SLO when p99 over every
request -- rejected and timed-out ones counted as infinitely slow -- is within slo_p99_ms. Once a rate
both misses the SLO and falls short of its offered load (the server is saturated), higher rates of that
mode are not run: they can only be worse, and each would cost duration_s.

Metrics: {"serving": {...}} (docs/ARCHITECTURE.md; the report's "Serving" section reads it).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from optforge.errors import StageFailure
from optforge.recipe import ServeBenchmarkParams
from optforge.stages.base import StageContext, StageKind

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 300.0  # importing torch and loading (or compiling) a model in the child
SATURATED = 0.9  # achieved / arrived below this, with the SLO missed: higher rates are skipped


def run(ctx: StageContext) -> dict:
    from optforge.serve.choose import choose_config
    from optforge.stages.data import EVAL_FILE, read_examples

    params: ServeBenchmarkParams = ctx.params
    configs = [role.split(":", 1)[1] for role in ctx.inputs if role.startswith("model:")]
    choice = choose_config(params.config, configs, ctx.input_metrics, params.baseline, params.gates)
    name = choice["config"]
    ctx.log(f"serving {name!r} ({choice['why']})")
    artifact = ctx.inputs[f"model:{name}"]
    precision = (ctx.input_metrics.get(f"benchmark:{name}") or {}).get("precision") or \
        (ctx.input_metrics.get(f"evaluate:{name}") or {}).get("precision") or "fp32"
    texts, _ = read_examples(Path(ctx.inputs["data"]) / EVAL_FILE)
    if not texts:
        raise StageFailure("the eval split is empty: no texts to send")

    runs, notes, server_info = [], [], {}
    for mode, max_batch in (("batching_off", 1), ("batching_on", params.max_batch)):
        with ChildServer(artifact, ctx.device, precision, max_batch, params.max_wait_ms, name) as server:
            server_info = server.info
            warm_up(server.port, texts, max_batch)
            for i, rate in enumerate(params.rates):
                summary = measure(server.port, texts, rate, params, max_batch, seed=params.seed + 1000 * i)
                summary["mode"] = mode
                runs.append(summary)
                ctx.log(f"  {mode} (max_batch {max_batch}) {rate:g} rps offered: {summary['achieved_rps']:.1f} "
                        f"achieved, p50 {fmt_ms(summary['p50_ms'])} p99 {fmt_ms(summary['p99_ms'])} ms, "
                        f"{summary['rejected']} rejected, {summary['timeouts']} timed out"
                        + ("" if summary["meets_slo"] else f" (p99 over the {params.slo_p99_ms:g} ms SLO)"))
                rest = params.rates[i + 1:]
                # against what the Poisson draw actually sent, not the nominal rate: a short run at a
                # low rate can arrive well under its nominal rate with the server idle most of the time
                sent = summary.get("arrival_rps") or rate
                if rest and not summary["meets_slo"] and summary["achieved_rps"] < SATURATED * sent:
                    notes.append(f"{mode}: saturated at {rate:g} rps offered ({summary['achieved_rps']:.1f} "
                                 f"achieved, SLO missed); higher rates ({', '.join(f'{r:g}' for r in rest)}) "
                                 "not run")
                    break

    from optforge.serve.loadgen import max_rps_under_slo

    serving = {
        "config": name,
        "choice": choice,
        "precision": precision,
        "slo_p99_ms": float(params.slo_p99_ms),
        "max_wait_ms": float(params.max_wait_ms),
        "duration_s": float(params.duration_s),
        "max_requests": int(params.max_requests),
        "rates": [float(r) for r in params.rates],
        "runs": runs,
        "max_rps_under_slo": {mode: max_rps_under_slo([r for r in runs if r["mode"] == mode])
                              for mode in ("batching_off", "batching_on")},
        "server": {k: server_info.get(k) for k in ("model", "torch_threads", "cpu_count")},
        "notes": notes,
    }
    (ctx.out / "serving.json").write_text(json.dumps(serving, indent=1, sort_keys=True) + "\n")
    return {"serving": serving}


def fmt_ms(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def measure(port: int, texts: list[str], rate: float, params: ServeBenchmarkParams, max_batch: int,
            seed: int) -> dict:
    from optforge.serve.loadgen import run_load, summarize

    # a request not answered within this is a timeout (and, for the SLO, infinitely slow)
    timeout_s = max(5.0, 20 * params.slo_p99_ms / 1000)
    load = asyncio.run(run_load(port, texts, rate, params.duration_s, params.max_requests, seed,
                                timeout_s=timeout_s))
    return summarize(load, params.slo_p99_ms, max_batch)


def warm_up(port: int, texts: list[str], max_batch: int, rounds: int = 3) -> None:
    """A few sequential requests, then bursts that fill the largest batch: first-call costs (allocator,
    kernel selection, a compiled model's shapes) stay out of the measured runs."""
    from optforge.serve.loadgen import Client

    async def go():
        client = Client(port, max_connections=max(max_batch, 8))
        try:
            for i in range(rounds):
                await asyncio.wait_for(client.post_json("/predict", {"text": texts[i % len(texts)]}), 60)
            for _ in range(rounds):
                burst = [client.post_json("/predict", {"text": texts[j % len(texts)]}) for j in range(max_batch)]
                await asyncio.wait_for(asyncio.gather(*burst), 120)
        finally:
            client.close()

    asyncio.run(go())


class ChildServer:
    """`python -m optforge.serve.server` on 127.0.0.1 with a free port; waits until /healthz says ok."""

    def __init__(self, artifact, device: str, precision: str, max_batch: int, max_wait_ms: float, config: str):
        self.args = [sys.executable, "-m", "optforge.serve.server", "--artifact", str(artifact), "--device", device,
                     "--precision", precision, "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                     "--config", config]
        self.proc = None
        self.port = None
        self.info: dict = {}
        self.log = tempfile.TemporaryFile(mode="w+")

    def __enter__(self):
        from optforge.procs import child_env

        repo = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL,
                                     text=True, env=child_env(env))
        try:
            self.port = self._read_port()
            self.info = self._wait_healthy()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc):
        self._stop()

    def _fail(self, what: str):
        self.log.seek(0)
        tail = self.log.read()[-2000:].strip()
        raise StageFailure(f"the server {what}" + (f": {tail.splitlines()[-1]}" if tail else ""))

    def _read_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if sel.select(timeout=0.5):
                    line = self.proc.stdout.readline()
                    if not line:
                        self._fail(f"exited (code {self.proc.wait(5)}) before listening")
                    try:
                        return int(json.loads(line)["port"])
                    except (ValueError, KeyError, TypeError):
                        continue  # something else printed to stdout: keep reading
                if self.proc.poll() is not None:
                    self._fail(f"exited (code {self.proc.returncode}) before listening")
        self._fail(f"did not listen within {START_TIMEOUT_S:.0f}s")

    def _wait_healthy(self) -> dict:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"exited (code {self.proc.returncode})")
            try:
                conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=5)
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status == 200:
                    return json.loads(body)
            except OSError:
                pass
            time.sleep(0.05)
        self._fail("did not become healthy within 60s")

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()


KIND = StageKind("serve_benchmark", "1", ServeBenchmarkParams, run, hardware_bound=True, measures_time=True,
                 tolerates_failed_inputs=True)
