"""evaluate: accuracy and macro-F1 of any model artifact (float, quantized, compiled) on eval.jsonl,
run through `optforge.runtime.load_runnable` on the build's device and precision.

A deterministic "this op/kernel does not exist here" failure (a quantized kernel missing for this
device or shape) becomes a StageFailure with a one-line reason: the report shows the row as failed and
the build goes on. Anything else is a bug and propagates."""

from __future__ import annotations

from optforge.errors import StageFailure
from optforge.recipe import EvaluateParams
from optforge.stages.base import StageContext, StageKind

# Substrings (lower case) of RuntimeError messages that mean "unsupported here", not "broken".
UNSUPPORTED = ("not implemented for", "could not run", "no kernel", "not supported", "unsupported",
               "doesn't support", "does not support", "no matching kernel", "not compiled with")


def run(ctx: StageContext) -> dict:
    from optforge import training
    from optforge.runtime import load_runnable
    from optforge.stages.data import EVAL_FILE, read_examples

    params: EvaluateParams = ctx.params
    texts, labels = read_examples(ctx.inputs["data"] / EVAL_FILE)
    training.configure_threads()
    with unsupported_as_failure("load"):
        runnable = load_runnable(ctx.inputs["model"], ctx.device, params.precision)
    ids = runnable.tokenize(texts)

    def forward(input_ids, attention_mask):
        return runnable.forward({"input_ids": input_ids, "attention_mask": attention_mask})

    with unsupported_as_failure("forward"):
        logits = training.predict_logits(forward, ids, runnable.pad_id, runnable.device, params.batch_size)
    metrics = training.classification_metrics(logits.argmax(-1).tolist(), labels, runnable.num_labels)
    ctx.log(f"{ctx.name}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
            f"({runnable.description}, n={metrics['n']})")
    return metrics


class unsupported_as_failure:
    """Context manager: NotImplementedError, or a RuntimeError whose message says the op is unsupported,
    becomes StageFailure("<what>: <first line>")."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, StageFailure):
            return False
        reason = unsupported_reason(exc)
        if reason is None:
            return False
        raise StageFailure(f"{self.what}: {reason}") from exc


def unsupported_reason(exc: BaseException):
    """One line saying why, if `exc` is a deterministic unsupported-op failure; else None."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = first if len(first) <= 200 else first[:197] + "..."
    if isinstance(exc, NotImplementedError):
        return f"{type(exc).__name__}: {first}"
    if isinstance(exc, RuntimeError) and any(s in text.lower() for s in UNSUPPORTED):
        return first
    return None


KIND = StageKind(kind="evaluate", version="1", params_model=EvaluateParams, run=run, hardware_bound=True)
