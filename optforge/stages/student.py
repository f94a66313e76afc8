"""student: a smaller model to distill into. Either a subset of the teacher's layers (embeddings, the
chosen layers, pooling and head copied exactly; any family optforge.arch knows) or a random-init BERT
encoder from a config that shares the teacher's tokenizer, pooling and labels."""

from __future__ import annotations

from optforge.errors import RecipeError
from optforge.recipe import StudentSpec
from optforge.stages.base import StageContext, StageKind


def run(ctx: StageContext) -> dict:
    from optforge import arch, modeling

    spec: StudentSpec = ctx.params
    teacher, tokenizer, meta = modeling.load_classifier(ctx.inputs["teacher"])
    if spec.from_teacher is not None:
        layers = spec.from_teacher.layers
        try:
            student = modeling.select_layers(teacher, layers)
        except arch.UnsupportedArchitecture as e:
            raise RecipeError(e.reason, ("student", "from_teacher")) from None
        except ValueError as e:
            raise RecipeError(str(e), ("student", "from_teacher", "layers")) from None
        source = f"teacher layers {layers}"
    else:
        encoder = modeling.random_encoder(spec.config, vocab_size=len(tokenizer),
                                          pad_token_id=tokenizer.pad_token_id or 0,
                                          max_position_embeddings=max(512, int(meta["max_length"])))
        student = modeling.TextClassifier(encoder, teacher.num_labels, teacher.pooling,
                                          label_names=teacher.label_names)
        student.init_head(seed=spec.config.seed)
        source = "random-init"
    modeling.save_classifier(student, tokenizer, {"max_length": meta["max_length"], "source": source}, ctx.out)
    ctx.log(f"student: {source}")
    return {"source": source, "num_layers": len(modeling.encoder_layers(student.encoder)),
            "params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters())}


KIND = StageKind(kind="student", version="1", params_model=StudentSpec, run=run)
