"""lm_student (the `student` stage of a causal-lm recipe): the teacher's embeddings, LM head and the
transformer blocks `from_teacher.layers` (renumbered for the KV cache), or a random-init GPT-2 `config` with
the teacher's tokenizer. Untrained here: `distill` trains it."""

from __future__ import annotations

from optforge.recipe import StudentSpec
from optforge.stages.base import StageContext, StageKind


def run(ctx: StageContext) -> dict:
    from optforge.lm import model as lm_model

    spec: StudentSpec = ctx.params
    teacher, tokenizer, meta = lm_model.load_float(ctx.inputs["teacher"])
    if spec.from_teacher is not None:
        model = lm_model.select_layers(teacher, spec.from_teacher.layers)
        how = f"teacher layers {spec.from_teacher.layers}"
    else:
        model = lm_model.random_gpt2(spec.config, teacher.config.vocab_size, teacher.config.max_position_embeddings,
                                     lm_model.eos_id(tokenizer))
        how = "random-init gpt2"
    params = sum(p.numel() for p in model.parameters())
    lm_model.save_float(model, tokenizer, {"max_length": meta["max_length"], "source": f"student ({how})"}, ctx.out)
    ctx.log(f"student: {how}, {params / 1e6:.2f} M parameters")
    return {"layers": model.config.num_hidden_layers, "params": params, "source": how}


KIND = StageKind(kind="lm_student", version="1", params_model=StudentSpec, run=run, task="causal-lm")
