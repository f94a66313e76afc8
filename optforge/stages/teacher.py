"""teacher: the model every configuration starts from.

- A checkpoint that already is a sequence classifier (`*ForSequenceClassification` in its config) is
  loaded with AutoModelForSequenceClassification and used as is: its own head and weights. Its output
  labels are matched to the data's (`optforge.labels.align`, `teacher.label_map`) and its classification
  layer reordered so that output i is data label i. It is fine-tuned only when `finetune` is given.
- A bare encoder (pkg:/hf:/folder) or a random-init `config` gets a new head (`pooling`: optforge's
  mean/CLS pooling + Linear, or the architecture's stock head) and is fine-tuned on the train split.

Then it is evaluated on the eval split and saved as a float artifact (`modeling.save_classifier`)."""

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
    metrics: dict = {}
    model, source, finetune = build(spec, data, tokenizer, metrics, ctx.log)
    limit = getattr(model.encoder.config, "max_position_embeddings", None)
    if limit is not None and data.max_length > limit:
        raise RecipeError(f"max_length {data.max_length} exceeds the model's {limit} positions",
                          ("data", "max_length"))

    pad_id = tokenizer.pad_token_id or 0
    metrics["source"] = source
    if finetune is not None:
        ids = tokens.tokenize(tokenizer, data.train_texts, data.max_length)
        stats = training.train(model, ids, data.train_labels, finetune, ctx.device, pad_id,
                               bar=ctx.bar, desc="teacher finetune")
        metrics.update(stats)
        ctx.log(f"teacher: {stats['steps']} steps, {stats['examples_per_s']:.1f} ex/s, "
                f"final loss {stats['final_loss']:.4f}")
    training.configure_threads()
    eval_ids = tokens.tokenize(tokenizer, data.eval_texts, data.max_length)
    metrics.update(training.evaluate_model(model.to(ctx.device), eval_ids, data.eval_labels, pad_id, ctx.device,
                                           bar=ctx.bar))
    metrics["params"] = sum(p.numel() for p in model.parameters())
    modeling.save_classifier(model.cpu(), tokenizer, {"max_length": data.max_length, "source": source}, ctx.out)
    return metrics


def build(spec: TeacherSpec, data, tokenizer, metrics: dict, log) -> tuple:
    """(model, source description, the TrainSpec to fine-tune with or None)."""
    from optforge import labels, modeling

    config = modeling.load_config(spec.model, spec.trust_remote_code) if spec.model is not None else None
    if config is not None and modeling.is_classifier_config(config):
        if spec.pooling in ("mean", "cls"):
            raise RecipeError(f"{spec.model!r} is already a classifier ({config.architectures[0]}): "
                              f"pooling {spec.pooling!r} would replace its trained head; remove `pooling` to use "
                              f"it as is, or point `model` at a bare encoder", ("teacher", "pooling"))
        model = modeling.load_seq_classifier(spec.model, spec.trust_remote_code)
        order, names, how = labels.align(data.label_names, model.label_names, spec.label_map)
        if order != list(range(len(order))):
            model.permute_labels(order)
        model.set_label_names(names)
        metrics.update({"head": "checkpoint", "label_match": how, "label_order": order})
        log(f"teacher: {spec.model} is a {config.architectures[0]}: its own head, labels matched {how}")
        return model, spec.model, spec.train_spec(classifier=True)

    finetune = spec.train_spec(classifier=False)
    if spec.label_map is not None:
        raise RecipeError(f"{spec.model!r} is a bare encoder: it gets a new head trained on the data's labels, so "
                          f"there is nothing for `label_map` to match", ("teacher", "label_map"))
    if finetune is None:
        log("teacher: `finetune: null` leaves the new classification head untrained (accuracy at chance)")
    seed = finetune.seed if finetune is not None else 0
    if spec.pooling == "stock":
        if spec.model is not None:
            model = modeling.load_seq_classifier(spec.model, spec.trust_remote_code, num_labels=data.num_labels,
                                                 label_names=data.label_names, seed=seed)
        else:
            model = modeling.random_seq_classifier(spec.config, vocab_size=len(tokenizer),
                                                   label_names=data.label_names,
                                                   pad_token_id=tokenizer.pad_token_id or 0,
                                                   max_position_embeddings=max(512, data.max_length))
        metrics["head"] = "stock (new)"
        return model, spec.model or "random-init", finetune
    if spec.model is not None:
        encoder = modeling.load_encoder(spec.model, spec.trust_remote_code)
    else:
        encoder = modeling.random_encoder(spec.config, vocab_size=len(tokenizer),
                                          pad_token_id=tokenizer.pad_token_id or 0,
                                          max_position_embeddings=max(512, data.max_length))
    model = modeling.TextClassifier(encoder, data.num_labels, spec.pooling or "mean", label_names=data.label_names)
    model.init_head(seed=seed)
    return model, spec.model or "random-init", finetune


KIND = StageKind(kind="teacher", version="2", params_model=TeacherSpec, run=run)
