"""Data-parallel training: a training spec's `devices: N` (teacher finetune, distill, prune recover).

`training.train` with N > 1 calls `train_data_parallel`, which runs the same `train` in N worker processes,
one per GPU (backend NCCL) or N on the CPU (gloo: what the tests run). Each worker is a `Rank`: it wraps
the model in DistributedDataParallel and takes its share of every batch (`batching.shard_batch`), the
batches being the ones a single device would train on, in the same order, so the optimizer steps are
the same ones. What differs from one device: the order of float sums (gradients are summed across
ranks), each rank's padded width, and dropout masks (rank r seeds spec.seed + r; no single-device run
draws those masks). With dropout off the weights agree with a single-device run to float tolerance
(tests/test_distributed.py); with it on, the runs are the same training in distribution, not bit for bit.

How the workers start: `torch.multiprocessing.start_processes(start_method="spawn")` from the stage's own
process, not `torchrun`. The stage is one step of a build: it has its model, data and teacher logits in
memory, its progress bar and its cache directory; torchrun would relaunch the whole build in N copies
(each planning, locking the cache and running every other stage) or need a second entry point that
re-reads all of it. Here the stage process stays the supervisor: it writes the model and the examples
once to a scratch directory, the workers load them, rank 0 relays its progress over a queue and writes
the trained weights back, and the stage loads them into its model and goes on as after a single-device
`train` (evaluate, save the artifact through `modeling.save_classifier`, the one door).

Failures: a rank that raises ends the job (the others are terminated) and `train` raises
`DataParallelError` with that rank's traceback; a rank that dies (killed, out of memory) likewise. A rank
stuck in a collective gives up after $OPTFORGE_DDP_TIMEOUT_S (default 600 s) of waiting for the others;
the workers die with the build (procs.die_with_parent). No rank ever waits without a bound.
"""

from __future__ import annotations

import os
import queue as queue_module
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from optforge.errors import OptforgeError

DEVICES_ENV = "OPTFORGE_TRAIN_DEVICES"  # overrides every training spec's `devices` in a build
TIMEOUT_ENV = "OPTFORGE_DDP_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600
PAYLOAD, RESULT, RENDEZVOUS = "payload.pt", "result.pt", "rendezvous"


class DataParallelError(RuntimeError):
    """A rank failed: the message names it and carries its traceback (not an OptforgeError: a rank that
    crashes is a bug or the machine's doing, and its traceback is what to report)."""


def requested_devices(spec) -> int:
    """How many data-parallel processes train `spec`: $OPTFORGE_TRAIN_DEVICES if set, else `spec.devices`
    (1 for a spec without it)."""
    env = os.environ.get(DEVICES_ENV, "").strip()
    if not env:
        return getattr(spec, "devices", 1)
    if not env.isdigit() or int(env) < 1:
        raise OptforgeError(f"{DEVICES_ENV}={env!r}: give a whole number of devices >= 1 (1 trains on one device)")
    n = int(env)
    if n > spec.batch_size:
        raise OptforgeError(f"{DEVICES_ENV}={n} exceeds the training batch_size {spec.batch_size}: each device takes "
                            f"batch_size/devices examples of every batch; use at most {spec.batch_size}")
    return n


def check_devices(n: int, device: str) -> None:
    """N ranks on CUDA need N visible GPUs (one each); on the CPU any N runs (processes share the cores)."""
    if torch.device(device).type != "cuda":
        return
    visible = torch.cuda.device_count()
    if n > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise OptforgeError(f"devices: {n} asks for {n} GPUs; this machine has {visible} visible"
                            + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
                            + f"; use devices: {visible} or fewer, or set {DEVICES_ENV}")


@dataclass(frozen=True)
class Rank:
    """One worker's place in the data-parallel group: what `training.train` asks of it."""

    index: int
    world: int

    def wrap(self, model: nn.Module, device: str) -> nn.Module:
        """The model behind DDP: gradients are averaged across ranks during backward. Buffers are not
        re-broadcast every step (BERT's are constants: position ids), and parameters that take no part in
        the loss are an error on the second step (find_unused_parameters would search for them every step;
        optforge's encoders are built without the pooler they would not use)."""
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        cuda = torch.device(device).type == "cuda"
        # torch 2.13 renamed broadcast_buffers (now deprecated); older ones only know it
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else "broadcast_buffers")
        return DistributedDataParallel(model, device_ids=[torch.device(device).index] if cuda else None,
                                       gradient_as_bucket_view=True, **{no_sync: False})

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (gloo has no ReduceOp.AVG: a sum, divided)."""
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t / self.world


# --------------------------------------------------------------------------- the stage's side


def train_data_parallel(n: int, train: Callable[..., dict], bar: Optional[Callable], job: dict) -> dict:
    """`train(**job)` (training.train and its arguments but `bar` and `rank`) in `n` worker processes,
    each passing its `rank`; rank 0 gets a `bar` relaying to this one. `job["model"]` ends trained in place
    (on `job["device"]`, in eval mode) as after a single-device `train`; returns rank 0's statistics (steps,
    losses averaged over the ranks, examples/s of the whole group) plus `devices`. `train` travels by
    reference (pickled as its module and name), so this module does not import the training loop."""
    model, device = job["model"], job["device"]
    check_devices(n, device)
    scratch = Path(tempfile.mkdtemp(prefix="optforge-ddp-"))
    try:
        torch.save({"train": train, "job": job, "progress": bar is not None}, scratch / PAYLOAD)
        relay: mp.Queue = mp.get_context("spawn").Queue()
        workers = mp.start_processes(_worker, args=(n, str(scratch), relay, os.getpid()), nprocs=n, join=False,
                                     start_method="spawn")
        _supervise(workers, n, relay, bar)
        result = torch.load(scratch / RESULT, map_location="cpu", weights_only=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model.load_state_dict(result["state"])
    model.to(device).eval()
    return result["stats"] | {"devices": n}


def _supervise(workers, n: int, relay, bar: Optional[Callable]) -> None:
    """Wait for the workers, showing rank 0's progress on `bar`; on a failed rank, stop the others and
    raise DataParallelError."""
    mirror = _BarMirror(bar)
    try:
        while not workers.join(timeout=0.1):
            mirror.drain(relay)
        mirror.drain(relay)
    except mp.ProcessRaisedException as e:
        raise DataParallelError(f"data-parallel training: rank {e.error_index} of {n} failed:\n{e}") from None
    except mp.ProcessExitedException as e:
        raise DataParallelError(f"data-parallel training: rank {e.error_index} of {n} died "
                                f"({_exit_reason(e)}); the other ranks were stopped") from None
    finally:
        for p in workers.processes:  # on success they are gone; after a failure join() killed them
            if p.is_alive():
                p.kill()
            p.join(5)
        mirror.close()


def _exit_reason(e: "mp.ProcessExitedException") -> str:
    if e.signal_name:
        return f"signal {e.signal_name}: killed, perhaps for memory"
    return f"exit code {e.exit_code}"


class _BarMirror:
    """The stage's progress bar, driven by rank 0's `_BarRelay` messages."""

    def __init__(self, bar: Optional[Callable]):
        self.bar, self.progress = bar, None

    def drain(self, relay) -> None:
        while True:
            try:
                op, *args = relay.get_nowait()
            except queue_module.Empty:
                return
            if op == "open":
                self.progress = self.bar(**args[0])
            elif self.progress is not None and op == "update":
                self.progress.update(*args)
            elif self.progress is not None and op == "postfix":
                self.progress.set_postfix(*args)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


class _BarRelay:
    """What rank 0 passes to `train` as its `bar`: forwards the calls to the stage process."""

    def __init__(self, relay):
        self.relay = relay

    def __call__(self, **kw):
        self.relay.put(("open", kw))
        return self

    def update(self, n: int = 1) -> None:
        self.relay.put(("update", n))

    def set_postfix(self, values: dict) -> None:
        self.relay.put(("postfix", values))

    def close(self) -> None:
        pass  # the stage's bar closes when the workers are done


# --------------------------------------------------------------------------- a worker


def _worker(index: int, world: int, scratch: str, relay, parent_pid: int) -> None:
    """Rank `index`: load the payload, join the group, train, and (rank 0) write the weights back."""
    from optforge import procs

    os.environ[procs.PARENT_ENV] = str(parent_pid)
    procs.die_with_parent()
    payload = torch.load(Path(scratch) / PAYLOAD, map_location="cpu", weights_only=False)
    job = payload["job"]
    cuda = torch.device(job["device"]).type == "cuda"
    if cuda:
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    else:  # the ranks share the cores ($OPTFORGE_THREADS, when set, still decides)
        device = "cpu"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ.setdefault("OPTFORGE_THREADS", str(max(1, cores // world)))
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=(Path(scratch) / RENDEZVOUS).as_uri(),
                            rank=index, world_size=world, timeout=timeout,
                            **({"device_id": torch.device(device)} if cuda else {}))
    try:
        bar = _BarRelay(relay) if index == 0 and payload["progress"] else None
        stats = payload["train"](**(job | {"device": device}), bar=bar, rank=Rank(index, world))
        if index == 0:
            state = {k: v.detach().cpu() for k, v in job["model"].state_dict().items()}
            torch.save({"state": state, "stats": stats}, Path(scratch) / (RESULT + ".tmp"))
            os.replace(Path(scratch) / (RESULT + ".tmp"), Path(scratch) / RESULT)
    finally:
        dist.destroy_process_group()
