"""Where a data-parallel training step's time goes on this host: the all-reduce bandwidth NCCL gets between
the GPUs, and one encoder's step (forward + backward + AdamW) on every rank with and without DDP's gradient
all-reduce. For when `benchmarks/train_scaling.py` shows less speedup than the GPUs' compute suggests.

    python benchmarks/ddp_step_profile.py --model bert-large --batch-size 128 --devices 2 --out ddp_profile.json

Per rank: `--batch-size` examples of `--length` random tokens (the per-device batch), bf16 autocast,
fp32 weights and gradients, word embeddings frozen (what `train_scaling.py` trains). Timed with CUDA events over
`--steps` steps after `--warmup`:
  * `local`: each rank alone (DDP's `no_sync`: no all-reduce), i.e. the compute a step cannot avoid;
  * `ddp`: the same step with DDP's bucketed all-reduce overlapping the backward pass;
  * `allreduce`: one all-reduce of a buffer the size of the gradients (fp32), and its bus bandwidth
    (NCCL's definition: size * 2(n-1)/n / time).
With `NCCL_DEBUG=INFO` NCCL prints which transport it chose (P2P/NVLink, SHM, NET).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_scaling import MODELS, make_model  # noqa: E402


def _rank(index: int, world: int, args, rendezvous: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.cuda.set_device(index)
    device = torch.device("cuda", index)
    dist.init_process_group("nccl", init_method=rendezvous, rank=index, world_size=world, device_id=device)
    from optforge.training import freeze_word_embeddings

    model = make_model(args.model)
    freeze_word_embeddings(model)  # as train_scaling.py's spec does
    model = model.to(device).train()
    ddp = DistributedDataParallel(model, device_ids=[index], gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    g = torch.Generator(device="cpu").manual_seed(index)
    ids = torch.randint(1000, 30000, (args.batch_size, args.length), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (args.batch_size,), generator=g).to(device)

    def step(sync: bool) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if sync:
                logits = ddp(ids, mask)
            else:
                with ddp.no_sync():
                    logits = ddp(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        if sync:
            loss.backward()
        else:
            with ddp.no_sync():
                loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn, steps: int) -> float:
        for _ in range(args.warmup):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps / 1000  # s per call

    local_s = timed(lambda: step(False), args.steps)
    ddp_s = timed(lambda: step(True), args.steps)
    grads = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buf = torch.ones(grads, dtype=torch.float32, device=device)
    ar_s = timed(lambda: dist.all_reduce(buf), 10)
    if index == 0:
        size = grads * 4
        Path(out).write_text(json.dumps({
            "model": args.model, "devices": world, "per_device_batch": args.batch_size, "length": args.length,
            "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "step_local_ms": local_s * 1e3, "step_ddp_ms": ddp_s * 1e3,
            "ddp_overhead_ms": (ddp_s - local_s) * 1e3,
            "grad_bytes": size, "allreduce_ms": ar_s * 1e3,
            "allreduce_busbw_gb_s": size * 2 * (world - 1) / world / ar_s / 1e9,
            "examples_per_s_local_x_devices": args.batch_size * world / local_s,
            "examples_per_s_ddp": args.batch_size * world / ddp_s}, indent=1))
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="bert-large")
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="per device")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("ddp_profile.json"))
    args = ap.parse_args()

    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < args.devices:
        print(f"needs {args.devices} GPUs; {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="ddp-profile-")
    rendezvous = (Path(scratch) / "rendezvous").as_uri()
    t0 = time.perf_counter()
    mp.start_processes(_rank, args=(args.devices, args, rendezvous, str(args.out)), nprocs=args.devices,
                       start_method="spawn")
    result = json.loads(args.out.read_text())
    print(json.dumps(result, indent=1))
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
