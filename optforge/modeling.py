"""The text classifier every stage trains, prunes, quantizes and serves: encoder + pooling + linear head.

An artifact directory holds
  model.safetensors      the whole state dict (encoder.* and head.*); never pickled
  config.json            the encoder's HF config (as the encoder was *built*, before any pruning)
  head.json              num_labels, pooling, dropout, label_names, per-layer shapes (informative)
  tokenizer/             the HF tokenizer files
  optforge_model.json    {"format": "float", "precision", "num_labels", "max_length", "pooling", ...}

Structured pruning physically shrinks Linear layers, so config.json alone does not describe the model:
`load_classifier` rebuilds every Linear from the shapes stored in model.safetensors (see `fit_to_state`).

Two heads. `TextClassifier` is optforge's own: encoder + mean/CLS pooling + one Linear, built when the
teacher is a bare encoder. `HFSeqClassifier` wraps a stock transformers `*ForSequenceClassification`
model with the architecture's own head (a checkpoint that already is a classifier, used as is, or a bare
encoder given `pooling: stock`); its config.json is the whole classifier's, head.json says
`"head": "stock"`, and only it can be exported as a stock transformers directory.

Model sources: "pkg:<python package>/<subdir>", "hf:<org/name>", or a local folder (`optforge.model_source`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from optforge.errors import one_line
from optforge.model_source import ModelSourceError, resolve_source  # noqa: F401 (re-exported)

WEIGHTS = "model.safetensors"
ENCODER_CONFIG = "config.json"
HEAD = "head.json"
TOKENIZER_DIR = "tokenizer"
META = "optforge_model.json"

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PRECISION_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


# --------------------------------------------------------------------------- the model


class TextClassifier(nn.Module):
    """`forward(input_ids, attention_mask) -> logits [B, num_labels]`.

    pooling "mean" averages the token states under the attention mask (sentence-transformers'
    definition: what MiniLM was trained with); "cls" takes the first token's state.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, pooling: str = "mean",
                 dropout: Optional[float] = None, label_names: Optional[list[str]] = None):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names else [str(i) for i in range(num_labels)]
        if dropout is None:
            dropout = getattr(encoder.config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled sentence embedding [B, H] (before dropout and head)."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(input_ids, attention_mask)))

    def init_head(self, seed: int = 0) -> None:
        """BERT-style head init (normal(0, initializer_range), zero bias), reproducible."""
        std = getattr(self.encoder.config, "initializer_range", 0.02)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nn.init.normal_(self.head.weight, std=std)
            nn.init.zeros_(self.head.bias)


class HFSeqClassifier(nn.Module):
    """A stock transformers sequence classifier (`hf`, a `*ForSequenceClassification`), called like a
    TextClassifier: `forward(input_ids, attention_mask) -> logits [B, num_labels]`. `encoder` is its base
    model (BertModel, DistilBertModel, ...: what student-from-layers, pruning and quantization work on);
    the head (pooler, pre_classifier, classifier) is the architecture's own."""

    pooling = "stock"

    def __init__(self, hf: nn.Module, label_names: Optional[list[str]] = None):
        super().__init__()
        self.hf = hf
        self.num_labels = int(hf.config.num_labels)
        if label_names is None:
            id2label = getattr(hf.config, "id2label", None) or {}
            label_names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(self.num_labels)]
        self.label_names = list(label_names)

    @property
    def encoder(self) -> nn.Module:
        return self.hf.base_model

    @property
    def config(self):
        return self.hf.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits

    def set_label_names(self, names: list[str]) -> None:
        """Label names in output order, written into the config (id2label / label2id) too."""
        self.label_names = list(names)
        self.hf.config.id2label = {i: n for i, n in enumerate(names)}
        self.hf.config.label2id = {n: i for i, n in enumerate(names)}

    def permute_labels(self, order: list[int]) -> None:
        """Reorder the outputs: new output i is old output order[i] (the classifier's last Linear's rows)."""
        final = classifier_output_layer(self)
        idx = torch.tensor(order)
        with torch.no_grad():
            final.weight.copy_(final.weight[idx].clone())
            if final.bias is not None:
                final.bias.copy_(final.bias[idx].clone())
        self.set_label_names([self.label_names[i] for i in order])


def classifier_output_layer(model: "HFSeqClassifier") -> nn.Linear:
    """The Linear that writes the logits: the last nn.Linear outside the base model with num_labels outputs."""
    base = model.hf.base_model
    base_ids = {id(m) for m in base.modules()}
    found = [m for m in model.hf.modules() if isinstance(m, nn.Linear) and id(m) not in base_ids
             and m.out_features == model.num_labels]
    if not found:
        raise ModelSourceError(f"cannot find the classification layer of a {type(model.hf).__name__}")
    return found[-1]


def is_classifier_config(config) -> bool:
    """Whether an HF config (object or dict) describes a sequence classifier (its trained head is part of
    the checkpoint) rather than a bare encoder."""
    archs = config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None)
    return any(str(a).endswith("ForSequenceClassification") for a in (archs or []))


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's list of transformer blocks (BERT/RoBERTa: encoder.layer; DistilBERT: transformer.layer)."""
    for path in ("encoder.layer", "transformer.layer", "layers", "layer"):
        obj = encoder
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ModelSourceError(f"cannot find the transformer layers of a {type(encoder).__name__}")


def select_layers(model: TextClassifier, indices: list[int]) -> TextClassifier:
    """A copy of `model` keeping only the transformer layers `indices` (in that order); embeddings,
    pooling and head are copied unchanged."""
    import copy

    new = copy.deepcopy(model)
    layers = encoder_layers(new.encoder)
    n = len(layers)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has {n} layers (0..{n - 1})")
    kept = [layers[i] for i in indices]
    for pos, layer in enumerate(kept):  # cache bookkeeping only; keep it consistent
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = pos
    layers_parent = new.encoder
    for part in _layer_path(model.encoder).split(".")[:-1]:
        layers_parent = getattr(layers_parent, part)
    setattr(layers_parent, _layer_path(model.encoder).split(".")[-1], nn.ModuleList(kept))
    new.encoder.config.num_hidden_layers = len(kept)
    return new


def _layer_path(encoder: nn.Module) -> str:
    target = encoder_layers(encoder)
    for name, m in encoder.named_modules():
        if m is target:
            return name
    raise ModelSourceError(f"cannot find the transformer layers of a {type(encoder).__name__}")


def layer_shapes(model: nn.Module) -> list[dict]:
    """Per layer: attention width (all heads' size), head count and FFN width, read from the Linear shapes."""
    encoder = model.encoder if isinstance(model, (TextClassifier, HFSeqClassifier)) else model
    out = []
    for layer in encoder_layers(encoder):
        attn = getattr(getattr(layer, "attention", None), "self", None)
        entry = {}
        if attn is not None and hasattr(attn, "query"):
            width = _out_features(attn.query)
            entry["attention_width"] = width
            entry["heads"] = width // attn.attention_head_size
        inter = getattr(getattr(layer, "intermediate", None), "dense", None)
        if inter is not None:
            entry["intermediate"] = _out_features(inter)
        out.append(entry)
    return out


def _out_features(linear: nn.Module) -> int:
    if hasattr(linear, "out_features"):
        return int(linear.out_features)
    return int(linear.weight.shape[0])


# --------------------------------------------------------------------------- source resolution


@contextlib.contextmanager
def _quiet_transformers():
    """HF loading prints load reports and progress bars; a build log wants none of it."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _from_pretrained(loader, ref: str, what: str, **kw):
    kind, where = resolve_source(ref)
    with _quiet_transformers():
        if kind == "path":
            try:
                return loader(where, **kw)
            except (OSError, ValueError) as e:
                raise ModelSourceError(f"cannot load the {what} from {ref!r} ({where}): {one_line(e)}") from e
        try:  # the local HF cache first: works offline, never waits on the network
            return loader(where, local_files_only=True, **kw)
        except (OSError, ValueError):
            pass
        try:
            return loader(where, **kw)
        except (OSError, ValueError) as e:
            raise ModelSourceError(
                f"cannot load the {what} {ref!r}: not in the local Hugging Face cache and not downloadable "
                f"({one_line(e)}); fix: run once with network access, or point to a local folder") from e


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer.from_pretrained, ref, "tokenizer", trust_remote_code=trust_remote_code)


def load_encoder(ref: str, trust_remote_code: bool = False) -> nn.Module:
    """A pretrained encoder in fp32, without BERT's pooler (we pool ourselves)."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig.from_pretrained, ref, "model config", trust_remote_code=trust_remote_code)
    cls, extra = _encoder_class(config, trust_remote_code)
    return _from_pretrained(cls.from_pretrained, ref, "model", dtype=torch.float32,
                            trust_remote_code=trust_remote_code, **extra)


def _encoder_class(config, trust_remote_code: bool):
    if config.model_type == "bert":
        from transformers import BertModel

        return BertModel, {"add_pooling_layer": False}
    from transformers import AutoModel

    return AutoModel, {}


def load_config(ref: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig.from_pretrained, ref, "model config", trust_remote_code=trust_remote_code)


def load_seq_classifier(ref: str, trust_remote_code: bool = False, num_labels: Optional[int] = None,
                        label_names: Optional[list[str]] = None, seed: int = 0) -> HFSeqClassifier:
    """A stock `*ForSequenceClassification` in fp32: the checkpoint's own head when it has one
    (`num_labels` None), else a new head for `num_labels` labels initialised by transformers under `seed`."""
    from transformers import AutoModelForSequenceClassification

    kw: dict = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if num_labels is not None:
        kw["num_labels"] = num_labels
        if label_names:
            kw["id2label"] = {i: n for i, n in enumerate(label_names)}
            kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, ref, "classifier", **kw)
    return HFSeqClassifier(hf)


def random_encoder(spec, vocab_size: int, pad_token_id: int = 0, max_position_embeddings: int = 512) -> nn.Module:
    """A BERT encoder with random weights from a RandomInitSpec; the same seed gives the same weights."""
    from transformers import BertModel

    config = _random_bert_config(spec, vocab_size, pad_token_id, max_position_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return BertModel(config, add_pooling_layer=False)


def random_seq_classifier(spec, vocab_size: int, label_names: list[str], pad_token_id: int = 0,
                          max_position_embeddings: int = 512) -> HFSeqClassifier:
    """A stock BertForSequenceClassification with random weights from a RandomInitSpec (same seed, same
    weights): a random-init teacher with `pooling: stock`."""
    from transformers import BertForSequenceClassification

    config = _random_bert_config(spec, vocab_size, pad_token_id, max_position_embeddings)
    config.num_labels = len(label_names)
    config.id2label = {i: n for i, n in enumerate(label_names)}
    config.label2id = {n: i for i, n in enumerate(label_names)}
    config.architectures = ["BertForSequenceClassification"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return HFSeqClassifier(BertForSequenceClassification(config))


def _random_bert_config(spec, vocab_size: int, pad_token_id: int, max_position_embeddings: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                      num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                      max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id)


# --------------------------------------------------------------------------- save / load


def save_classifier(model: TextClassifier, tokenizer, meta: dict, out_dir) -> dict:
    """Write a float artifact into `out_dir`. `meta` must give max_length; returns the optforge_model.json
    written. Reusable by any stage that produces a float TextClassifier (teacher, student, prune...)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "max_length" not in meta:
        raise ValueError("save_classifier: meta needs 'max_length'")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # tied weights (a stock head may share tensors) are stored once each under every name
    state = {k: v.clone() if _shares_storage(v, state, k) else v for k, v in state.items()}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    if isinstance(model, HFSeqClassifier):
        model.hf.config.to_json_file(str(out / ENCODER_CONFIG))
        head = {"head": "stock", "num_labels": model.num_labels, "pooling": "stock",
                "label_names": model.label_names, "architecture": type(model.hf).__name__,
                "layers": layer_shapes(model)}
    else:
        model.encoder.config.to_json_file(str(out / ENCODER_CONFIG))
        head = {"num_labels": model.num_labels, "pooling": model.pooling, "dropout": model.dropout.p,
                "label_names": model.label_names, "layers": layer_shapes(model)}
    _write_json(out / HEAD, head)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    dtype = next(model.parameters()).dtype
    full = dict(meta)
    full.update({"format": "float", "precision": DTYPE_NAMES.get(dtype, str(dtype)), "num_labels": model.num_labels,
                 "pooling": model.pooling, "label_names": model.label_names})
    _write_json(out / META, full)
    return full


def _shares_storage(v: torch.Tensor, state: dict, key: str) -> bool:
    ptr = v.untyped_storage().data_ptr()
    return any(k < key and t.untyped_storage().data_ptr() == ptr for k, t in state.items())


def read_meta(artifact_dir) -> dict:
    path = Path(artifact_dir) / META
    if not path.is_file():
        raise ModelSourceError(f"{artifact_dir} is not an optforge model artifact (no {META})")
    return json.loads(path.read_text())


def load_classifier(artifact_dir, trust_remote_code: bool = False) -> tuple[TextClassifier, object, dict]:
    """(model on CPU in its saved dtype, in eval mode; tokenizer; optforge_model.json). Rebuilds every
    Linear from the tensor shapes in model.safetensors, so structurally pruned models load as saved."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    d = Path(artifact_dir)
    meta = read_meta(d)
    with _quiet_transformers():
        model = classifier_skeleton(d, trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(d / TOKENIZER_DIR))
    state = load_file(str(d / WEIGHTS))
    fit_to_state(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer, meta


def classifier_skeleton(artifact_dir, trust_remote_code: bool = False) -> nn.Module:
    """The artifact's classifier (TextClassifier or HFSeqClassifier) as built from its configs, before any
    weights are loaded or Linear shapes fitted: random weights, fp32."""
    from transformers import AutoConfig

    d = Path(artifact_dir)
    head = json.loads((d / HEAD).read_text())
    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
        if head.get("head") == "stock":
            from transformers import AutoModelForSequenceClassification

            hf = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
            return HFSeqClassifier(hf, head.get("label_names"))
        cls, extra = _encoder_class(config, trust_remote_code)
        if cls.__name__ == "AutoModel":
            encoder = cls.from_config(config, trust_remote_code=trust_remote_code)
        else:
            encoder = cls(config, **extra)
    return TextClassifier(encoder, head["num_labels"], head["pooling"], head.get("dropout"),
                          head.get("label_names"))


def fit_to_state(model: nn.Module, state: dict) -> None:
    """Resize every nn.Linear whose saved weight has another shape (structured pruning), then make the
    attention modules' head bookkeeping agree with their new widths."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        w = state.get(f"{name}.weight")
        if w is None or tuple(w.shape) == tuple(module.weight.shape):
            continue
        new = nn.Linear(w.shape[1], w.shape[0], bias=f"{name}.bias" in state, dtype=module.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    for module in model.modules():
        if hasattr(module, "query") and hasattr(module, "attention_head_size"):
            width = _out_features(module.query)
            module.all_head_size = width
            module.num_attention_heads = width // module.attention_head_size


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
