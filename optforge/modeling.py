"""The text classifier every stage trains, prunes, quantizes and serves: encoder + pooling + linear head.

An artifact directory holds
  model.safetensors      the whole state dict (encoder.* and head.*); never pickled
  config.json            the encoder's HF config (as the encoder was *built*, before any pruning)
  head.json              num_labels, pooling, dropout, label_names, per-layer shapes (informative; only
                         for the architectures optforge.arch knows)
  tokenizer/             the HF tokenizer files
  optforge_model.json    {"format": "float", "precision", "num_labels", "max_length", "pooling", ...}

Structured pruning physically shrinks Linear layers, so config.json alone does not describe the model:
`load_classifier` rebuilds every Linear from the shapes stored in model.safetensors (see `fit_to_state`).

Model sources: "pkg:<python package>/<subdir>", "hf:<org/name>", or a local folder (`optforge.model_source`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from optforge import arch
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


def encoder_layers(model: nn.Module, operation: str = "reading the transformer layers") -> nn.ModuleList:
    """The list of transformer blocks of a classifier's encoder, or of an encoder (optforge.arch knows where
    each family keeps them: BERT/RoBERTa/ELECTRA encoder.layer, DistilBERT transformer.layer)."""
    return arch.adapter_for(model, operation).layers(arch.encoder_of(model))


def select_layers(model: TextClassifier, indices: list[int]) -> TextClassifier:
    """A copy of `model` keeping only the transformer layers `indices` (in that order); embeddings,
    pooling and head are copied unchanged."""
    import copy

    adapter = arch.adapter_for(model, "a student made of teacher layers")
    new = copy.deepcopy(model)
    encoder = arch.encoder_of(new)
    layers = adapter.layers(encoder)
    n = len(layers)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has {n} layers (0..{n - 1})")
    kept = [layers[i] for i in indices]
    for pos, layer in enumerate(kept):  # cache bookkeeping only; keep it consistent
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = pos
    adapter.set_layers(encoder, nn.ModuleList(kept))
    return new


def layer_shapes(model: nn.Module) -> list[dict]:
    """Per layer: attention width (all heads' size), head count and FFN width, read from the Linear shapes."""
    adapter = arch.adapter_for(model, "layer shapes")
    out = []
    for layer in adapter.layers(arch.encoder_of(model)):
        width = _out_features(adapter.linear(layer, "query"))
        out.append({"attention_width": width, "heads": width // adapter.head_size(layer),
                    "intermediate": _out_features(adapter.linear(layer, "ffn_in"))})
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
    """A pretrained base model in fp32, without the pooler BERT and RoBERTa carry (we pool ourselves)."""
    from transformers import AutoConfig, AutoModel

    config = _from_pretrained(AutoConfig.from_pretrained, ref, "model config", trust_remote_code=trust_remote_code)
    return _from_pretrained(AutoModel.from_pretrained, ref, "model", dtype=torch.float32,
                            trust_remote_code=trust_remote_code, **_build_kwargs(config, pooler=False))


def build_encoder(config, trust_remote_code: bool = False, pooler: bool = False) -> nn.Module:
    """A base model with random weights shaped by `config` (weights are loaded over it), built as
    `load_encoder` builds it: without a pooler unless `pooler` (an artifact saved with one)."""
    from transformers import AutoModel

    with _quiet_transformers():
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code, **_build_kwargs(config, pooler))


def _build_kwargs(config, pooler: bool) -> dict:
    adapter = arch.find_adapter(config)
    return dict(adapter.build_kwargs) if adapter is not None and not pooler else {}


def random_encoder(spec, vocab_size: int, pad_token_id: int = 0, max_position_embeddings: int = 512) -> nn.Module:
    """A BERT encoder with random weights from a RandomInitSpec; the same seed gives the same weights."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                        num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                        max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return BertModel(config, add_pooling_layer=False)


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
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    model.encoder.config.to_json_file(str(out / ENCODER_CONFIG))
    head = {"num_labels": model.num_labels, "pooling": model.pooling, "dropout": model.dropout.p,
            "label_names": model.label_names}
    if arch.find_adapter(model) is not None:  # other encoders still save; their shapes are not known
        head["layers"] = layer_shapes(model)
    _write_json(out / HEAD, head)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    dtype = next(model.parameters()).dtype
    full = dict(meta)
    full.update({"format": "float", "precision": DTYPE_NAMES.get(dtype, str(dtype)), "num_labels": model.num_labels,
                 "pooling": model.pooling, "label_names": model.label_names})
    _write_json(out / META, full)
    return full


def read_meta(artifact_dir) -> dict:
    path = Path(artifact_dir) / META
    if not path.is_file():
        raise ModelSourceError(f"{artifact_dir} is not an optforge model artifact (no {META})")
    return json.loads(path.read_text())


def load_classifier(artifact_dir, trust_remote_code: bool = False) -> tuple[TextClassifier, object, dict]:
    """(model on CPU in its saved dtype, in eval mode; tokenizer; optforge_model.json). Rebuilds every
    Linear from the tensor shapes in model.safetensors, so structurally pruned models load as saved."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    d = Path(artifact_dir)
    meta = read_meta(d)
    head = json.loads((d / HEAD).read_text())
    state = load_file(str(d / WEIGHTS))
    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(d), trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(str(d / TOKENIZER_DIR))
    encoder = build_encoder(config, trust_remote_code, pooler=any(k.startswith("encoder.pooler.") for k in state))
    model = TextClassifier(encoder, head["num_labels"], head["pooling"], head.get("dropout"),
                           head.get("label_names"))
    fit_to_state(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval(), tokenizer, meta


def fit_to_state(model: nn.Module, state: dict) -> None:
    """Resize every nn.Linear whose saved weight has another shape (structured pruning), then make the
    attention modules' head bookkeeping agree with their new widths (optforge.arch)."""
    resized = False
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        w = state.get(f"{name}.weight")
        if w is None or tuple(w.shape) == tuple(module.weight.shape):
            continue
        new = nn.Linear(w.shape[1], w.shape[0], bias=f"{name}.bias" in state, dtype=module.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        resized = True
    adapter = arch.find_adapter(model)
    if adapter is None:
        if resized:
            raise arch.UnsupportedArchitecture(arch.model_type(model), "loading a structurally pruned model")
        return
    for layer in adapter.layers(arch.encoder_of(model)):
        adapter.set_attention_width(layer, _out_features(adapter.linear(layer, "query")))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
