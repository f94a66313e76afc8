"""The batch function that runs a `Runnable` for the batcher: texts -> predictions, with timings.

Runs in the batcher's worker thread. Tokenizes the whole batch at once and pads to the batch's longest
sequence (`Runnable.encode` without `pad_to`), so a batch of short texts costs a short forward.
"""

from __future__ import annotations

import time


def batch_function(runnable):
    """`run(texts) -> (predictions, {"tokenize", "forward", "postprocess": ms})` for `runnable`."""
    import torch

    sync = runnable.device.type == "cuda"
    names = runnable.label_names

    def run(texts: list[str]):
        t0 = time.perf_counter()
        batch = runnable.encode(texts)
        t1 = time.perf_counter()
        logits = runnable.forward(batch)
        if sync:  # asynchronous kernels: make "forward" the forward, not the later copy
            torch.cuda.synchronize(runnable.device)
        t2 = time.perf_counter()
        probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
        out = []
        for row in probs:
            label = max(range(len(row)), key=row.__getitem__)
            out.append({"label": label, "label_name": names[label], "probabilities": row})
        t3 = time.perf_counter()
        return out, {"tokenize": (t1 - t0) * 1e3, "forward": (t2 - t1) * 1e3, "postprocess": (t3 - t2) * 1e3}

    return run


def load_for_serving(artifact_dir, device: str, precision: str = "fp32"):
    """(runnable, batch function), with torch using every core for intra-op work."""
    from optforge import training
    from optforge.artifacts import load_runnable

    training.configure_threads()
    runnable = load_runnable(artifact_dir, device, precision)
    return runnable, batch_function(runnable)
