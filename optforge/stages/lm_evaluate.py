"""lm_evaluate (an `evaluate:<config>` stage of a causal-lm recipe): perplexity of the row's artifact on the
eval split, by the fixed protocol of optforge.lm.perplexity (context length and stride in the parameters),
loaded through `optforge.artifacts.load_runnable` on the build's device and precision. A compiled row is
evaluated with its weights run eagerly (optforge.artifacts.lm). A missing kernel is a StageFailure with a
one-line reason, as for classifiers."""

from __future__ import annotations

from optforge.errors import StageFailure, kernel_failure
from optforge.recipe import LMEvaluateParams
from optforge.stages.base import RowStep, StageContext, StageKind


def run(ctx: StageContext) -> dict:
    from optforge import training
    from optforge.artifacts import load_runnable
    from optforge.lm.perplexity import perplexity, token_stream
    from optforge.lm.train import read_split
    from optforge.stages.data import EVAL_FILE

    params: LMEvaluateParams = ctx.params
    training.configure_threads()
    with kernel_failure("load"):
        runnable = load_runnable(ctx.inputs["model"], ctx.device, params.precision, verify=False)
    limit = getattr(runnable.model.config, "max_position_embeddings", None)
    if limit is not None and params.context_length > limit:
        raise StageFailure(f"perplexity context_length {params.context_length} exceeds the model's {limit} positions")
    stream = token_stream(runnable.tokenizer, read_split(ctx.inputs["data"], EVAL_FILE))
    with kernel_failure("forward"):
        metrics = perplexity(runnable.logits, stream, params.context_length, params.stride, runnable.device,
                             params.batch_size, bar=ctx.bar)
    metrics["evaluated"] = "eager (the compiled row's weights)" if runnable.compiled else "as loaded"
    ctx.log(f"{ctx.name}: perplexity {metrics['perplexity']:.3f} over {metrics['tokens_scored']} tokens "
            f"(context {params.context_length}, stride {params.stride}; {runnable.description})")
    return metrics


KIND = StageKind(kind="lm_evaluate", version="1", params_model=LMEvaluateParams, run=run, hardware_bound=True,
                 task="causal-lm",
                 row=RowStep(order=100, measure=True, applies=lambda recipe, c: True,
                             params=LMEvaluateParams.for_row, needs_data=True, stage="evaluate"))
