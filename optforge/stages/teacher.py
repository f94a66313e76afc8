"""teacher: load a pretrained encoder (pkg:/hf:/folder) or build a random one, add pooling + a linear
head, optionally fine-tune it on the data stage's train split, evaluate, save a float artifact."""

from __future__ import annotations

from optforge.errors import RecipeError
from optforge.recipe import TeacherSpec
from optforge.stages.base import StageContext, StageKind


def run(ctx: StageContext) -> dict:
    from optforge import modeling, tokens, training
    from optforge.stages.data import Splits

    spec: TeacherSpec = ctx.params
    data = Splits(ctx.inputs["data"], ctx.input_metrics.get("data"))
    tokenizer = modeling.load_tokenizer(spec.tokenizer or spec.model, spec.trust_remote_code)
    if spec.model is not None:
        encoder = modeling.load_encoder(spec.model, spec.trust_remote_code)
        source = spec.model
    else:
        encoder = modeling.random_encoder(spec.config, vocab_size=len(tokenizer),
                                          pad_token_id=tokenizer.pad_token_id or 0,
                                          max_position_embeddings=max(512, data.max_length))
        source = "random-init"
    limit = getattr(encoder.config, "max_position_embeddings", None)
    if limit is not None and data.max_length > limit:
        raise RecipeError(f"max_length {data.max_length} exceeds the model's {limit} positions",
                          ("data", "max_length"))
    model = modeling.TextClassifier(encoder, data.num_labels, spec.pooling, label_names=data.label_names)
    model.init_head(seed=spec.finetune.seed if spec.finetune else 0)

    pad_id = tokenizer.pad_token_id or 0
    metrics: dict = {"source": source}
    if spec.finetune is not None:
        ids = tokens.tokenize(tokenizer, data.train_texts, data.max_length)
        stats = training.train(model, ids, data.train_labels, spec.finetune, ctx.device, pad_id,
                               bar=ctx.bar, desc="teacher finetune")
        metrics.update(stats)
        ctx.log(f"teacher: {stats['steps']} steps, {stats['examples_per_s']:.1f} ex/s, "
                f"final loss {stats['final_loss']:.4f}")
    training.configure_threads()
    eval_ids = tokens.tokenize(tokenizer, data.eval_texts, data.max_length)
    metrics.update(training.evaluate_model(model.to(ctx.device), eval_ids, data.eval_labels, pad_id, ctx.device))
    metrics["params"] = sum(p.numel() for p in model.parameters())
    modeling.save_classifier(model.cpu(), tokenizer, {"max_length": data.max_length, "source": source}, ctx.out)
    return metrics


KIND = StageKind(kind="teacher", version="1", params_model=TeacherSpec, run=run)
