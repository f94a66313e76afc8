"""lm_teacher (the `teacher` stage of a causal-lm recipe): the causal LM every configuration starts from.

`teacher.model` (hf:/pkg:/a folder) is loaded with AutoModelForCausalLM (no remote code) and used as given
unless `finetune` is set; `teacher.config` builds a random-init GPT-2 (layers, hidden, heads, FFN width from
the config; the tokenizer's vocabulary padded to a multiple of 64; 1024 positions) and trains it from
scratch (`finetune` "auto": the TrainSpec defaults with the embeddings trained) on blocks of
`data.max_length` tokens of the train split's token stream. Saved as a float LM artifact (optforge.lm.model).
"""

from __future__ import annotations

from optforge.errors import RecipeError
from optforge.recipe import TeacherSpec
from optforge.stages.base import StageContext, StageKind

RANDOM_POSITIONS = 1024


def run(ctx: StageContext) -> dict:
    from optforge import modeling
    from optforge.lm import model as lm_model
    from optforge.lm.train import train_blocks, train_lm

    spec: TeacherSpec = ctx.params
    max_length = int(ctx.input_metrics.get("data", {}).get("max_length") or 64)
    tokenizer = modeling.load_tokenizer(spec.tokenizer or spec.model)
    if spec.model is not None:
        lm_model.check_causal_config(spec.model)
        model = lm_model.load_pretrained(spec.model)
    else:
        model = lm_model.random_gpt2(spec.config, len(tokenizer), max(RANDOM_POSITIONS, max_length),
                                     lm_model.eos_id(tokenizer))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise RecipeError(f"max_length {max_length} exceeds the model's {limit} positions", ("data", "max_length"))
    metrics: dict = {"source": spec.model or "random-init gpt2", "model_type": model.config.model_type,
                     "layers": model.config.num_hidden_layers, "vocab_size": model.config.vocab_size}
    finetune = spec.lm_train_spec()
    if finetune is not None:
        data = train_blocks(tokenizer, ctx.inputs["data"], max_length)
        stats = train_lm(model, data, finetune, ctx.device, bar=ctx.bar, desc="teacher train")
        metrics.update(stats)
        ctx.log(f"teacher: {stats['steps']} steps on {len(data)} blocks of {max_length} tokens, "
                f"{stats['tokens_per_s']:.0f} tokens/s, loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f}")
    elif spec.config is not None:
        ctx.log("teacher: `finetune: null` leaves the random-init model untrained (perplexity near the vocabulary size)")
    metrics["params"] = sum(p.numel() for p in model.parameters())
    lm_model.save_float(model.cpu(), tokenizer, {"max_length": max_length, "source": metrics["source"]}, ctx.out)
    return metrics


KIND = StageKind(kind="lm_teacher", version="1", params_model=TeacherSpec, run=run, task="causal-lm")
