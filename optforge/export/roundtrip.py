"""The round trip every export passes before it is published: the exported model, loaded by its format's
`load_logits` (the target runtime alone), against the cached artifact loaded through
`optforge.artifacts.load_runnable`, on every example of the recipe's eval split.

Both sides get the same token ids (the cached artifact's tokenizer, truncated at its max_length) in the
same length-sorted, padded batches. Passing means: every argmax identical, and the largest |logit
difference| within the tolerance the compile stage allows between two computations of one model
(`optforge.methods.compile.allowed_difference` for the row's precision, relative to the logit scale).
When the export ships a tokenizer, the ids it gives for every text are compared with optforge's too
(`compare_tokens`).
"""

from __future__ import annotations

from typing import Callable, Optional

BATCH = 32


def compare(runnable, exported: Callable, texts: list[str], batch_size: int = BATCH,
            progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """{"examples", "batches", "batch_size", "argmax_identical", "first_mismatch", "max_abs_diff",
    "logit_scale", "finite"} over `texts`; `progress(done, total)` after each batch."""
    import numpy as np

    from optforge.batching import sorted_batches
    from optforge.tokens import pad_batch

    ids = runnable.tokenize(texts)
    batches = sorted_batches([len(x) for x in ids], batch_size)
    same, worst, scale, finite, first = 0, 0.0, 0.0, True, None
    for done, batch in enumerate(batches, 1):
        input_ids, mask = pad_batch([ids[i] for i in batch], runnable.pad_id)
        ref = runnable.forward({"input_ids": input_ids.to(runnable.device),
                                "attention_mask": mask.to(runnable.device)}).cpu().numpy()
        got = np.asarray(exported(input_ids.numpy(), mask.numpy()), dtype=np.float32)
        if got.shape != ref.shape:
            raise ValueError(f"the exported model returned logits of shape {got.shape}, expected {ref.shape}")
        finite = finite and bool(np.isfinite(got).all())
        agree = got.argmax(-1) == ref.argmax(-1)
        same += int(agree.sum())
        if first is None and not agree.all():
            row = int(np.flatnonzero(~agree)[0])
            first = {"text": texts[batch[row]], "exported": got[row].tolist(), "cached": ref[row].tolist()}
        worst = max(worst, float(np.abs(got - ref).max()) if got.size else 0.0)
        scale = max(scale, float(np.abs(ref).max()) if ref.size else 0.0)
        if progress is not None:
            progress(done, len(batches))
    return {"examples": len(texts), "batches": len(batches), "batch_size": batch_size, "argmax_identical": same,
            "first_mismatch": first, "max_abs_diff": worst, "logit_scale": scale, "finite": finite}


def compare_tokens(runnable, tokenizer_dir, texts: list[str]) -> dict:
    """{"texts", "identical", "first_mismatch"}: the exported tokenizer, called as a user calls it
    (`tokenizer(texts, truncation=True)`), against the ids optforge feeds the cached artifact."""
    from transformers import AutoTokenizer

    ours = runnable.tokenize(texts)
    theirs = AutoTokenizer.from_pretrained(str(tokenizer_dir))(list(texts), truncation=True)["input_ids"]
    differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if list(a) != list(b)]
    first = None
    if differ:
        i = differ[0]
        first = {"text": texts[i], "exported": list(theirs[i]), "cached": list(ours[i])}
    return {"texts": len(texts), "identical": len(texts) - len(differ), "first_mismatch": first}
