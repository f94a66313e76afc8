"""evaluate: accuracy and macro-F1 of any model artifact (float, quantized, compiled) on eval.jsonl,
run through `optforge.artifacts.load_runnable` on the build's device and precision.

A kernel that does not exist here (a quantized kernel missing for this device or shape) becomes a
StageFailure with a one-line reason (`errors.kernel_failure`, the one rule every stage uses): the report
shows the row as failed and the build goes on. Anything else is a bug and propagates."""

from __future__ import annotations

from optforge.errors import kernel_failure
from optforge.recipe import EvaluateParams
from optforge.stages.base import RowStep, StageContext, StageKind

def run(ctx: StageContext) -> dict:
    from optforge import training
    from optforge.artifacts import load_runnable
    from optforge.metrics import classification_metrics
    from optforge.stages.data import EVAL_FILE, read_examples

    params: EvaluateParams = ctx.params
    texts, labels = read_examples(ctx.inputs["data"] / EVAL_FILE)
    training.configure_threads()
    with kernel_failure("load"):
        runnable = load_runnable(ctx.inputs["model"], ctx.device, params.precision, verify=False)
    ids = runnable.tokenize(texts)

    def forward(input_ids, attention_mask):
        return runnable.forward({"input_ids": input_ids, "attention_mask": attention_mask})

    with kernel_failure("forward"):
        logits = training.predict_logits(forward, ids, runnable.pad_id, runnable.device, params.batch_size,
                                         bar=ctx.bar, desc="evaluate")
    metrics = classification_metrics(logits.argmax(-1).tolist(), labels, runnable.num_labels)
    ctx.log(f"{ctx.name}: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
            f"({runnable.description}, n={metrics['n']})")
    return metrics


KIND = StageKind(kind="evaluate", version="1", params_model=EvaluateParams, run=run, hardware_bound=True,
                 row=RowStep(order=100, measure=True, applies=lambda recipe, c: True,
                             params=lambda recipe, c: {"precision": c.precision}, needs_data=True))
