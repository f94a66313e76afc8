"""Architecture adapters: where each supported encoder family keeps the modules optforge operates on.

One registered `Adapter` per `config.model_type`. It knows, for the family's *base* model (`BertModel`,
`DistilBertModel`, ...): the path of the ModuleList of transformer blocks and the config key counting them,
and per block the six Linears by role (`query`, `key`, `value`, `attn_out`, `ffn_in`, `ffn_out`), the
attention module whose head bookkeeping must follow a structured shrink (`heads_attr`/`width_attr`; the
head size is its `attention_head_size`), the config key of the FFN width, the pooler the base model may
carry (run once per sequence, never used by optforge's own head), and the constructor arguments optforge
builds the encoder with (no pooler).

Who uses it: `modeling` (encoder_layers, select_layers, layer_shapes, fit_to_state, building encoders),
`stages/prune.py` (which Linears unstructured pruning touches; importance hooks and shrinking),
`artifacts/runnable.py` (FLOPs), and `recipe_io` at validate time (from a teacher's config.json).

A model is accepted as a config (or config dict), an HF base model, a stock `*ForSequenceClassification`
(its `base_model`), or a wrapper holding the base model as `encoder` (`modeling.TextClassifier`).
A model type without an adapter is `UnsupportedArchitecture`, one line naming the operation and the
supported types, never an AttributeError deep inside a stage.

Pure: importing this module imports neither torch nor transformers (modules are reached by attribute).
Adding a family: one `register(Adapter(...))` below, and its tiny model in tests/test_arch.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from optforge.errors import OptforgeError, shown

ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


class UnsupportedArchitecture(OptforgeError):
    """`[<stage>: ]model type 'xlnet'[ (<where>)] is not supported for <operation>; supported: bert, ...`
    (`where` says whose type it is when that is not the entry itself, e.g. `teacher.model`; `known`, the
    supported types when they are not this registry's encoders: causal LMs, optforge.lm.structure)."""

    def __init__(self, model_type: Optional[str], operation: str, stage: Optional[str] = None,
                 where: Optional[str] = None, known: Optional[list[str]] = None):
        self.model_type, self.operation, self.stage, self.where = model_type, operation, stage, where
        self.known = known
        super().__init__(f"{stage}: {self.reason}" if stage else self.reason)

    @property
    def reason(self) -> str:
        """The message without the stage (a RecipeError's key path locates it instead)."""
        where = f" ({self.where})" if self.where else ""
        return (f"model type {shown(self.model_type)}{where} is not supported for {self.operation}; "
                f"supported: {', '.join(self.known if self.known is not None else supported())}")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj, path: str, value) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(_get(obj, parent) if parent else obj, attr, value)


@dataclass(frozen=True)
class Adapter:
    model_type: str
    layers_path: str  # the ModuleList of transformer blocks, in the base model
    layer_count: str  # the config key counting them
    roles: dict[str, str]  # role -> path of its nn.Linear inside one block (every role in ROLES)
    attention_path: str  # the module holding attention_head_size and the head bookkeeping, inside a block
    heads_attr: str  # its head count attribute (num_attention_heads / n_heads)
    width_attr: str  # its all-heads width attribute (all_head_size / dim)
    ffn_width: str  # the config key of the FFN width
    pooler: Optional[str] = None  # the base model's pooler, when the family has one
    layers_count_attr: Optional[str] = None  # a count kept beside the ModuleList (DistilBERT: n_layers)
    build_kwargs: dict[str, Any] = field(default_factory=dict)  # how optforge builds the base model

    def layers(self, encoder):
        return _get(encoder, self.layers_path)

    def set_layers(self, encoder, layers) -> None:
        """Replace the blocks with `layers` (an nn.ModuleList) and make the counts agree."""
        _set(encoder, self.layers_path, layers)
        setattr(encoder.config, self.layer_count, len(layers))
        if self.layers_count_attr:
            _set(encoder, self.layers_path.rpartition(".")[0] + "." + self.layers_count_attr, len(layers))

    def linear(self, layer, role: str):
        return _get(layer, self.roles[role])

    def set_linear(self, layer, role: str, module) -> None:
        _set(layer, self.roles[role], module)

    def attention(self, layer):
        return _get(layer, self.attention_path)

    def head_size(self, layer) -> int:
        return int(self.attention(layer).attention_head_size)

    def set_attention_width(self, layer, width: int) -> None:
        """Head bookkeeping after the Q/K/V rows changed: heads = width / head size (every supported family
        reshapes with (-1, head_size) in transformers 5, so this is what stays true, not what is read)."""
        attention = self.attention(layer)
        setattr(attention, self.heads_attr, width // self.head_size(layer))
        setattr(attention, self.width_attr, width)

    def layer_linears(self, encoder) -> list:
        """The Linears of every transformer block, by role: what unstructured pruning prunes (not the
        embeddings or an embedding projection, not the pooler, not any classification head)."""
        return [self.linear(layer, role) for layer in self.layers(encoder) for role in ROLES]

    def pooler_module(self, encoder):
        return getattr(encoder, self.pooler, None) if self.pooler else None


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    if adapter.model_type in ADAPTERS:
        raise ValueError(f"architecture {adapter.model_type!r} is registered twice")
    if set(adapter.roles) != set(ROLES):
        raise ValueError(f"architecture {adapter.model_type!r}: roles must be exactly {ROLES}")
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def supported() -> list[str]:
    return sorted(ADAPTERS)


def _bert_like(model_type: str, pooler: Optional[str]) -> Adapter:
    """BERT and the families built on its modules (RoBERTa, XLM-RoBERTa, ELECTRA)."""
    return Adapter(
        model_type=model_type, layers_path="encoder.layer", layer_count="num_hidden_layers",
        roles={"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
               "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"},
        attention_path="attention.self", heads_attr="num_attention_heads", width_attr="all_head_size",
        ffn_width="intermediate_size", pooler=pooler,
        build_kwargs={"add_pooling_layer": False} if pooler else {})


register(_bert_like("bert", pooler="pooler"))
register(_bert_like("roberta", pooler="pooler"))
register(_bert_like("xlm-roberta", pooler="pooler"))
register(_bert_like("electra", pooler=None))  # no pooler; `embeddings_project` when embedding_size != hidden
register(Adapter(
    model_type="distilbert", layers_path="transformer.layer", layer_count="n_layers",
    roles={"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
           "attn_out": "attention.out_lin", "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2"},
    attention_path="attention", heads_attr="n_heads", width_attr="dim", ffn_width="hidden_dim",
    layers_count_attr="n_layers"))


# --------------------------------------------------------------------------- finding a model's adapter


def encoder_of(model):
    """The base model: a PreTrainedModel's `base_model` (itself for a base model, the inner one for a
    `*ForSequenceClassification`), else a wrapper's `encoder` (TextClassifier, HFSeqClassifier)."""
    if hasattr(model, "base_model_prefix") and hasattr(model, "base_model"):
        return model.base_model
    encoder = getattr(model, "encoder", None)
    return encoder if encoder is not None else model


def model_type(obj) -> Optional[str]:
    """`model_type` of a config dict, a config, or a model (its encoder's config)."""
    if isinstance(obj, dict):
        value = obj.get("model_type")
    elif hasattr(obj, "model_type") and not hasattr(obj, "config"):
        value = obj.model_type
    else:
        config = getattr(encoder_of(obj), "config", None)
        value = getattr(config, "model_type", None)
    return value if isinstance(value, str) else None


def find_adapter(obj) -> Optional[Adapter]:
    return ADAPTERS.get(model_type(obj))


def adapter_for(obj, operation: str, stage: Optional[str] = None) -> Adapter:
    """The adapter of `obj`'s model type, or UnsupportedArchitecture naming `operation` (and `stage`)."""
    adapter = find_adapter(obj)
    if adapter is None:
        raise UnsupportedArchitecture(model_type(obj), operation, stage)
    return adapter
