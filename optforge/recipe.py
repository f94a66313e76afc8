"""The recipe schema: one strict pydantic model per step kind. Defaults live here and nowhere else.

Pure: no torch, no I/O. Reading YAML with node positions and turning pydantic errors into located
`RecipeError`s is `optforge.recipe_io`'s job.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_serializer,
                      model_validator)

from optforge.errors import RecipeError, shown
from optforge.methods import compile as compile_methods
from optforge.methods import quantize as quant_methods
from optforge.remote_url import check_remote

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

Device = Literal["cpu", "cuda"]
DEVICES: tuple[str, ...] = ("cpu", "cuda")
Precision = Literal["fp32", "bf16", "fp16"]
# What runs a configuration's model: PyTorch (eager, quantized, compiled), or ONNX Runtime on the exported
# graph (optforge.stages.onnxruntime: CPU, fp32 or ONNX Runtime dynamic int8)
Runtime = Literal["torch", "onnxruntime"]
DEFAULT_RUNTIME = "torch"
# What the recipe optimizes: a text classifier (the default), or a causal language model (docs/ARCHITECTURE.md,
# "Causal-LM recipes": perplexity instead of accuracy, prefill / decode timings instead of batch latency)
Task = Literal["classification", "causal-lm"]
DEFAULT_TASK = "classification"
CAUSAL_LM = "causal-lm"
# Derived from the method registries (optforge.methods): a new method or mode is one definition there.
CompileMode = Literal[compile_methods.mode_names()]
QuantMethod = Literal[tuple(quant_methods.QUANT_METHODS)]


class Strict(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored). Strict types: no value is coerced
    into another type (`epochs: true` is not 1.0, `"64"` is not 64; an int is still a valid float), and
    numbers are finite (results are JSON, and a gate of .inf can never pass)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# every random seed: what numpy and torch accept alike
Seed = Annotated[int, Field(ge=0, lt=2**32)]


# --------------------------------------------------------------------------- data


class DataSpec(Strict):
    # A folder under the data root ($OPTFORGE_DATA_ROOT, default ./data), an absolute/relative folder,
    # or a Hugging Face dataset id "hf:glue/sst2" (needs network or a local datasets cache).
    dataset: str
    train: str = "train.tsv"  # file inside `dataset` (tsv/csv/jsonl), or a split name for hf:
    eval: str = "validation.tsv"
    text: str = "sentence"
    label: str = "label"
    max_length: int = Field(64, ge=8, le=512)
    max_train_samples: Optional[int] = Field(None, ge=2)
    max_eval_samples: Optional[int] = Field(None, ge=2)
    seed: Seed = 0
    # causal-lm: carve the eval split out of `train` (seeded, before any subsetting) instead of reading `eval`
    eval_fraction: Optional[float] = Field(None, gt=0, le=0.5)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return without_unset(self, handler(self), "eval_fraction")


# --------------------------------------------------------------------------- models


def without_unset(model: BaseModel, dumped: dict, *fields: str) -> dict:
    """`dumped` without those of `fields` that are None on `model`: fields added after recipes were keyed
    leave the dump (and so every key and the recipe hash) unchanged while unset."""
    for name in fields:
        if getattr(model, name) is None:
            dumped.pop(name, None)
    return dumped


def without_unkeyed(model: BaseModel, dumped: dict, info, **defaults) -> dict:
    """`dumped` without the fields that say how a stage runs, not what it computes (`TrainSpec.devices`):
    `defaults` maps each to its default. With the KEY_COMPAT context (stage keys, the lock file's record of
    them, the recipe hash) they are always left out: changing one reuses the cached result. In any other
    dump (the graph's stage parameters, which the stage reads) they stay unless at their default, so a
    recipe that does not set them dumps as it did before they existed."""
    keyed = bool(info.context and info.context.get("key_compat"))
    for name, default in defaults.items():
        if keyed or getattr(model, name) == default:
            dumped.pop(name, None)
    return dumped


class TrainSpec(Strict):
    """Fine-tuning hyper-parameters shared by teacher fine-tuning, distillation and prune recovery."""

    epochs: float = Field(3.0, gt=0, le=100)
    lr: float = Field(5e-5, gt=0, lt=1)
    batch_size: int = Field(32, ge=1, le=4096)
    warmup: float = Field(0.06, ge=0, lt=1)  # fraction of optimizer steps
    weight_decay: float = Field(0.01, ge=0, lt=1)
    seed: Seed = 0
    freeze_embeddings: bool = True  # word-embedding table: 30k x H; its AdamW update dominates CPU steps
    # Autocast of the training forward: "bf16" (fp32 master weights and optimizer) or "fp32". Unset = the
    # build device's default (device.default_train_precision: bf16 on a CUDA GPU and on a CPU with
    # AVX512_BF16/AMX, else fp32), resolved before keying (Recipe.with_train_precision): it enters the key
    precision: Optional[Literal["fp32", "bf16"]] = None
    # The word-embedding table's gradient when it is trained: "dense" (unset: every row, AdamW) or "sparse"
    # (only the rows of the batch's tokens, torch.optim.SparseAdam: "lazy" Adam, no weight decay on that
    # table). Sparse skips the vocab x hidden update of rows the batch did not touch: README "Choosing the
    # defaults" gives the measured step times and accuracies. Single-device training only
    embedding_grad: Optional[Literal["dense", "sparse"]] = None
    # Layer-wise learning-rate decay: the head keeps `lr`, transformer layer i of L gets lr * d^(L - i) and
    # the embeddings lr * d^(L + 1) (d = 1 or unset: one lr for everything). Unset is not in the key
    layer_lr_decay: Optional[float] = Field(None, gt=0, le=1)
    # Tail weight averaging: the model saved is the mean of the weights after evenly spaced steps (at most
    # 20, the last one included) of the last `average_last` fraction of the optimizer steps, not the
    # weights after the last step. Unset: the last step's weights (not in the key)
    average_last: Optional[float] = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _sparse_needs_trained_embeddings(self):
        if self.embedding_grad == "sparse" and self.freeze_embeddings:
            raise ValueError("embedding_grad: sparse changes how the word embeddings are trained, but "
                             "freeze_embeddings is true (the default), so they are not trained: set "
                             "freeze_embeddings: false, or remove embedding_grad")
        if self.embedding_grad == "sparse" and self.devices > 1:
            raise ValueError(f"embedding_grad: sparse trains on one device only (data-parallel all-reduce of a "
                             f"sparse gradient is not supported by NCCL), but devices is {self.devices}")
        return self

    # Data-parallel processes (optforge.distributed): N GPUs on CUDA (NCCL), N processes on a CPU (gloo). Each
    # takes batch_size/N of every batch, so the batches and optimizer steps are those of one device: the
    # same training up to the order of float sums. Not in the key (`without_unkeyed`): it names how the
    # model is trained, not what; $OPTFORGE_TRAIN_DEVICES overrides it at build time
    devices: int = Field(1, ge=1, le=64)

    @field_validator("devices")
    @classmethod
    def _devices_fit_batch(cls, v, info):
        batch = info.data.get("batch_size")  # absent when itself invalid: that error is reported at batch_size
        if batch is not None and v > batch:
            raise ValueError(f"devices {v} exceeds batch_size {batch}: each device takes batch_size/devices "
                             f"examples of every batch; use at most {batch} devices or a larger batch_size")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler, info):
        return without_unkeyed(self, without_unset(self, handler(self), "precision", "embedding_grad",
                                                        "layer_lr_decay", "average_last"), info,
                               devices=1)


class RandomInitSpec(Strict):
    """A model built from a config with random weights (tests, tiny recipes): a BERT-style encoder, or in a
    causal-lm recipe a GPT-2 (optforge.lm.model.random_gpt2; `intermediate_size` is its FFN width)."""

    num_layers: int = Field(2, ge=1, le=48)
    hidden_size: int = Field(64, ge=8, le=4096)
    num_heads: int = Field(2, ge=1, le=64)
    intermediate_size: int = Field(128, ge=8, le=16384)
    seed: Seed = 0

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        return self


class TeacherSpec(Strict):
    """The model to optimize. `model` is a pretrained checkpoint ("pkg:<python_package>/<subdir>",
    "hf:<org/name>" or a local directory); `config` builds a random-init BERT instead (tests).

    A checkpoint that already is a sequence classifier (its config's `architectures` name a
    `*ForSequenceClassification`: yours, or one from the Hub) is used **as is**: its own head, labels and
    weights, evaluated and optimized as given unless `finetune` is set. A bare encoder gets a new head,
    `pooling` picks which, and is fine-tuned (`finetune` absent: the TrainSpec defaults).

    In a causal-lm recipe `model` is loaded with AutoModelForCausalLM and used as given unless `finetune`
    is set, and `config` is a random-init GPT-2 trained from scratch (`lm_train_spec`); `pooling`,
    `label_map` and `trust_remote_code` are refused there."""

    model: Optional[str] = None
    config: Optional[RandomInitSpec] = None
    tokenizer: Optional[str] = None  # defaults to `model`; required with `config`
    # The head a bare encoder gets: "mean" / "cls" pool the token states into one Linear (optforge's head;
    # mean is what sentence encoders such as MiniLM were trained with); "stock" is the architecture's own
    # sequence-classification head (transformers' AutoModelForSequenceClassification), the one a stock
    # transformers directory (`optforge export --format hf`) can describe. Absent: the checkpoint's own head
    # when it is a classifier, else "mean". A classifier checkpoint only takes "stock" (or nothing).
    pooling: Optional[Literal["cls", "mean", "stock"]] = None
    # data label name -> the classifier checkpoint's label name (its config's id2label), when they differ
    label_map: Optional[dict[str, str]] = Field(None, min_length=1)
    trust_remote_code: bool = False
    # "auto" (absent): fine-tune a new head with the TrainSpec defaults; use a classifier as given.
    # null: never fine-tune (a new head then stays untrained: fine for timing, at chance for accuracy).
    finetune: Union[TrainSpec, Literal["auto"], None] = "auto"
    # The training precision of `finetune: auto` (a new head fine-tuned with the TrainSpec defaults):
    # filled with the device's default before keying (Recipe.with_train_precision); a recipe that wants
    # another writes `finetune: {precision: ...}` instead
    auto_precision: Optional[Literal["fp32", "bf16"]] = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.config is None):
            raise ValueError("give exactly one of `model` (pkg:/hf:/path) or `config` (random init)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a random-init `config` needs a `tokenizer` (pkg:/hf:/path)")
        if self.config is not None and self.label_map is not None:
            raise ValueError("`label_map` maps data labels to a classifier checkpoint's labels; a random-init "
                             "`config` gets a new head with the data's labels")
        return self

    @field_validator("label_map")
    @classmethod
    def _label_map(cls, v):
        if v is None:
            return v
        empty = [k for k, t in v.items() if not k or not t]
        if empty:
            raise ValueError(f"label names must be non-empty, got {shown(v)}")
        targets = list(v.values())
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            raise ValueError(f"two data labels map to the same checkpoint label {shown(twice)}")
        return v

    def lm_train_spec(self) -> Optional[TrainSpec]:
        """causal-lm: "auto" trains a random-init model (embeddings included) and uses a checkpoint as given."""
        if self.finetune == "auto":
            return TrainSpec(freeze_embeddings=False) if self.config is not None else None
        return self.finetune

    def train_spec(self, classifier: bool) -> Optional[TrainSpec]:
        """The fine-tuning to run: "auto" means the defaults for a new head, none for a classifier."""
        if self.finetune == "auto":
            return None if classifier else TrainSpec(precision=self.auto_precision)
        return self.finetune

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return without_unset(self, handler(self), "label_map", "auto_precision")


class FromTeacherSpec(Strict):
    layers: list[int] = Field(min_length=1)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v):
        if any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError(f"layer indices must be unique, got {shown(v)}")
        return sorted(v)


class StudentSpec(Strict):
    from_teacher: Optional[FromTeacherSpec] = None
    config: Optional[RandomInitSpec] = None  # narrower/fewer layers; shares the teacher's tokenizer

    @model_validator(mode="after")
    def _one_source(self):
        if (self.from_teacher is None) == (self.config is None):
            raise ValueError("give exactly one of `from_teacher: {layers: [...]}` or `config`")
        return self


class DistillSpec(TrainSpec):
    """loss = alpha * KL(softmax(s/T) || softmax(t/T)) * T^2 + (1 - alpha) * CE(s, y)"""

    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.7, ge=0, le=1)
    lr: float = Field(1e-4, gt=0, lt=1)


class PruneFields(Strict):
    """What a prune step does; the stage's parameters (`PruneParams`) are exactly these, validators included."""

    method: Literal["structured", "unstructured"]
    amount: float = Field(0.0, ge=0, lt=1)  # unstructured: fraction of Linear weights zeroed (L1)
    heads: float = Field(0.0, ge=0, lt=1)  # structured: fraction of attention heads removed per layer
    ffn: float = Field(0.0, ge=0, lt=1)  # structured: fraction of FFN channels removed per layer
    recover: Optional[DistillSpec] = None  # recovery distillation from the teacher after pruning

    @model_validator(mode="after")
    def _amounts(self):
        if self.method == "unstructured" and self.amount == 0:
            raise ValueError("unstructured pruning needs `amount` > 0 (fraction of weights to zero)")
        if self.method == "unstructured" and (self.heads or self.ffn):
            raise ValueError("`heads`/`ffn` are for method: structured; use `amount` here")
        if self.method == "structured" and self.heads == 0 and self.ffn == 0:
            raise ValueError("structured pruning needs `heads` > 0 or `ffn` > 0")
        if self.method == "structured" and self.amount:
            raise ValueError("`amount` is for method: unstructured; use `heads`/`ffn` here")
        return self


class PruneSpec(PruneFields):
    name: str = Field(pattern=NAME_RE)
    model: str = "student"  # teacher | student | another prune entry's name


def _quant_option_check(field: str):
    """Validator of one method parameter in a quantize entry: it must be a parameter of the entry's
    method, and valid for it (the method's own `params` model decides)."""

    def check(cls, value, info):
        if value is None:
            return value
        method = quant_methods.QUANT_METHODS.get(info.data.get("method"))
        if method is None:  # the method itself is the error, reported at `method`
            return value
        declared = method.params.model_fields
        if field not in declared:
            takes = f"its parameters: {', '.join(declared)}" if declared else "it takes no parameters"
            users = [m.name for m in quant_methods.QUANT_METHODS.values() if field in m.params.model_fields]
            raise ValueError(f"`{field}` is not a parameter of {method.name} ({takes}); it is for "
                             f"{', '.join(users)}")
        try:
            method.params.model_validate({field: value})
        except ValidationError as e:
            raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return value

    return field_validator(field)(check)


# Parameters every quantize stage's key has carried since before methods declared their own: a method
# without them keys on these values, so the stage keys of existing caches stay valid.
QUANTIZE_KEY_DEFAULTS = {"group_size": 128}


class _QuantizeStep(Strict):
    """Base of QuantizeSpec: it dumps with the method's parameters filled in (and nothing else, so a dump
    validates again). With the serialization context {"key_compat": True} (the recipe hash, the stage
    parameters) it adds QUANTIZE_KEY_DEFAULTS for the parameters its method does not declare."""

    @model_serializer(mode="wrap")
    def _dump(self, handler, info):
        out = {k: v for k, v in handler(self).items() if k not in quant_methods.option_fields()}
        if info.context and info.context.get("key_compat"):
            out |= QUANTIZE_KEY_DEFAULTS
        return out | quant_method_params(self).model_dump(mode="json")


KEY_COMPAT = {"key_compat": True}  # serialization context for what enters keys and the recipe hash


def _quantize_spec() -> type[BaseModel]:
    """`quantize[i]`: a name, a registered method, and that method's own parameters (only those)."""
    options = quant_methods.option_fields()
    return create_model(
        "QuantizeSpec", __base__=_QuantizeStep, __module__=__name__,
        __doc__="A named quantization step: `method` is a registered method (optforge.methods.quantize); "
                "any other key is one of that method's parameters.",
        __validators__={f"_check_{f}": _quant_option_check(f) for f in options},
        name=(str, Field(pattern=NAME_RE)), method=(QuantMethod, ...),
        **{f: (Optional[info.annotation], Field(None, description=info.description)) for f, info in options.items()})


QuantizeSpec = _quantize_spec()


def quant_method_params(spec) -> BaseModel:
    """The method's parameters of a quantize entry (its defaults filled in)."""
    method = quant_methods.get_method(spec.method)
    given = {f: getattr(spec, f) for f in method.params.model_fields if getattr(spec, f, None) is not None}
    return method.params.model_validate(given)


# --------------------------------------------------------------------------- configurations & report


class ConfigSpec(Strict):
    """One row of the production-readiness table: a path model -> precision -> quantize -> compile."""

    name: str = Field(pattern=NAME_RE)
    model: str = "teacher"  # teacher | student | a prune entry's name
    precision: Precision = "fp32"
    quantize: Optional[str] = None  # a quantize entry's name
    compile: CompileMode = "none"
    devices: Optional[list[Device]] = Field(None, min_length=1)  # where the row runs; None: every device
    runtime: Runtime = DEFAULT_RUNTIME  # onnxruntime: exported to ONNX and run by ONNX Runtime (CPU)

    @field_validator("devices")
    @classmethod
    def _devices(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"devices must be unique, got {shown(v)}")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """The default runtime stays out of dumps: a recipe written before `runtime` existed hashes as it
        did (session.env), and a dump still validates to the same row."""
        out = handler(self)
        if out.get("runtime") == DEFAULT_RUNTIME:
            del out["runtime"]
        return out

    def runs_on(self, device: str) -> bool:
        return self.devices is None or device in self.devices


class BenchmarkSpec(Strict):
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32], min_length=1)
    end_to_end: bool = True
    fixed_length: Optional[int] = Field(None, ge=2, le=512)  # pad every input to this many tokens
    warmup: int = Field(5, ge=0, le=1000)  # untimed calls per measured function (at least 1 runs)
    # Timed calls per side and scope a figure wants: STATS that got fewer (the time box ended first) say
    # "capped": true. It never lengthens the measurement (the time box and `min_rounds` decide that).
    min_runs: int = Field(20, ge=3, le=100000)
    # Time box of ONE batch size's paired measurement: every scope, the row and the baseline, warm-up
    # included (optforge.paired.measure_paired). The pipelined stream comes on top (`stream_seconds`).
    max_seconds: float = Field(10.0, gt=0, le=600)
    # Budget of the end-to-end pipelined stream (e2e_pipelined: throughput of `predict` one batch at a time
    # vs tokenizing the next batch while this one runs) per batch size; unset = half of max_seconds; 0 = no
    # stream. One pass each way is timed twice; it is not paired with the baseline.
    stream_seconds: Optional[float] = Field(None, ge=0, le=600)
    # Relative half-width of the speedup's confidence interval that ends the measurement early, and at or
    # below which a speedup is conclusive (wider at the end of the box: the row is "inconclusive").
    ci_width: float = Field(0.05, gt=0, lt=1)
    confidence: float = Field(0.95, ge=0.5, lt=1)  # of the bootstrap interval on every speedup
    # rounds (one block of every side and scope) before an interval: 6, since over 4 rounds a 95 % bootstrap
    # interval held the true ratio ~90 % of the time in tests/test_paired.py (6 rounds: 96 %)
    min_rounds: int = Field(6, ge=2, le=1000)
    threads: Optional[int] = Field(None, ge=1, le=1024)  # torch.set_num_threads; default: all cores
    seed: Seed = 0
    # causal-lm only (unset: LM_PROMPT_LENGTHS / LM_NEW_TOKENS): the prompt lengths prefill and time to first
    # token are measured at, and how many tokens one decode call generates (`batch_sizes`: the decode batches)
    prompt_lengths: Optional[list[int]] = Field(None, min_length=1)
    new_tokens: Optional[int] = Field(None, ge=2, le=4096)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return without_unset(self, handler(self), "prompt_lengths", "new_tokens", "stream_seconds")

    @field_validator("prompt_lengths")
    @classmethod
    def _prompts(cls, v):
        if v is None:
            return v
        if any(n < 1 or n > 32768 for n in v):
            raise ValueError(f"prompt lengths must be in 1..32768 tokens, got {shown(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"prompt lengths must be unique, got {shown(v)}")
        return sorted(v)

    @property
    def stream_budget(self) -> float:
        return self.max_seconds / 2 if self.stream_seconds is None else self.stream_seconds

    @field_validator("min_rounds")
    @classmethod
    def _even_rounds(cls, v):
        if v % 2:
            raise ValueError(f"min_rounds must be even (rounds alternate row-first and baseline-first in "
                             f"ABBA order, so an odd count leaves one side first more often), got {v}")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v):
        if any(b < 1 or b > 65536 for b in v):
            raise ValueError(f"batch sizes must be in 1..65536, got {shown(v)}")
        if len(set(v)) != len(v):
            raise ValueError(f"batch sizes must be unique, got {shown(v)}")
        return sorted(v)


class GatesSpec(Strict):
    max_accuracy_drop: float = Field(1.0, ge=0, le=100)  # accuracy points below the baseline
    # the low end of the paired speedup's confidence interval (end to end where both sides have it,
    # else model) must reach this at every batch size
    min_speedup: float = Field(1.0, gt=0)
    # Optional extra gates, off by default (None). How variable single calls are says nothing about how
    # well the median, and so the speedup, is known: the speedup's interval does (benchmark.ci_width).
    # max_spread: timing is "unstable" when, at some batch size and scope, the interquartile range of
    # per-call latencies exceeds this fraction of the median.
    max_spread: Optional[float] = Field(None, gt=0)
    # max_cv: std / mean above which timing is "unstable" (a few outliers on sub-millisecond calls make
    # it 10-20% with a steady median)
    max_cv: Optional[float] = Field(None, gt=0)
    # causal-lm: the accuracy gate is the perplexity increase over the baseline, in % (unset: LM_MAX_PPL_INCREASE)
    max_perplexity_increase: Optional[float] = Field(None, ge=0, le=1000)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return without_unset(self, handler(self), "max_perplexity_increase")


class ServeBenchmarkSpec(Strict):
    """Opt-in: serve one configuration over HTTP on loopback and drive it with open-loop Poisson load,
    batching off (max_batch 1) and on."""

    config: str = "best"  # a config name, or "best" (the report's best `ready` configuration)
    slo_p99_ms: float = Field(50.0, gt=0)
    rates: list[float] = Field(default_factory=lambda: [10.0, 25.0, 50.0, 100.0, 200.0], min_length=1)
    max_batch: int = Field(32, ge=2, le=4096)  # the batching-on run; batching-off is always max_batch 1
    max_wait_ms: float = Field(5.0, ge=0, le=1000)
    duration_s: float = Field(4.0, gt=0, le=120)  # per offered rate
    max_requests: int = Field(2000, ge=10, le=100000)  # per offered rate
    seed: Seed = 0

    @field_validator("rates")
    @classmethod
    def _rates(cls, v):
        if any(r <= 0 for r in v):
            raise ValueError(f"request rates must be > 0, got {shown(v)}")
        return sorted(v)


class CacheSpec(Strict):
    """Where this recipe's stages are shared beyond the local cache (optforge.remote). `remote`: an fsspec
    URL (s3://bucket/prefix, gs://..., file:///abs/path, ssh://host/path) with no credentials in it; a
    build reads through it (a stage whose key is there is downloaded and verified, never rerun).
    `push`: a build also uploads every stage it runs. $OPTFORGE_REMOTE and `--remote` override `remote`
    (`none` turns it off). Neither enters a stage key or the recipe hash: where results are kept is not
    what they are."""

    remote: Optional[str] = None
    push: bool = False

    @field_validator("remote")
    @classmethod
    def _remote(cls, v):
        return None if v is None else check_remote(v)


# causal-lm defaults of the fields above that classification recipes do not have
LM_PROMPT_LENGTHS = [16, 64]
LM_NEW_TOKENS = 32
LM_MAX_PPL_INCREASE = 5.0


class PerplexitySpec(Strict):
    """causal-lm: how perplexity is measured (optforge.lm.perplexity, the fixed protocol). The eval texts are
    joined into one token stream; windows of `context_length` tokens end every `stride` tokens, and each
    window scores only the tokens the previous one did not (the first window: all but its first token), each
    with at least context_length - stride tokens of context. The figure moves with both: compare rows of
    one recipe only, and published numbers only at the same protocol."""

    context_length: Optional[int] = Field(None, ge=8, le=32768)  # unset: data.max_length
    stride: Optional[int] = Field(None, ge=1, le=32768)  # unset: context_length // 2
    batch_size: int = Field(8, ge=1, le=4096)

    @model_validator(mode="after")
    def _stride(self):
        if self.stride is not None and self.context_length is not None and self.stride >= self.context_length:
            raise ValueError(f"stride {self.stride} must be below context_length {self.context_length}: each "
                             f"window scores its last `stride` tokens with the tokens before them as context")
        return self


class PartialOf:
    """Field metadata: the field holds a partial mapping merged key by key over the recipe section of
    the same name and validated as `model` (recipe_io lists `model`'s keys for an unknown one)."""

    def __init__(self, model: type[BaseModel]):
        self.model = model


class DeviceOverrides(Strict):
    """What one device changes. `benchmark`, `gates`, `serve_benchmark`: partial mappings merged over the
    top-level section (or its defaults), then validated as it; `serve_benchmark: false` turns the serving
    benchmark off on this device. `baseline`: a config name."""

    benchmark: Annotated[Optional[dict], PartialOf(BenchmarkSpec)] = None
    gates: Annotated[Optional[dict], PartialOf(GatesSpec)] = None
    serve_benchmark: Annotated[Union[dict, Literal[False], None], PartialOf(ServeBenchmarkSpec)] = None
    baseline: Optional[str] = None

    @field_validator("serve_benchmark", mode="before")
    @classmethod
    def _serve(cls, v):
        if v is None or v is False or isinstance(v, dict):
            return v
        raise ValueError(f"give a mapping of serve_benchmark keys to change, or false to turn the serving "
                         f"benchmark off on this device, got {shown(v)}")


class OverridesSpec(Strict):
    cpu: Optional[DeviceOverrides] = None
    cuda: Optional[DeviceOverrides] = None


class RecipeCheckErrors(RecipeError):
    """Every problem one of the recipe's own checks found (pydantic's checks raise ValidationError):
    pydantic-style error dicts (`details`: type, loc, msg), each `loc` the recipe key path of the value
    at fault. Behaves as the first; recipe_io words and locates each one like any schema error."""

    def __init__(self, details: list[dict]):
        super().__init__(details[0]["msg"], tuple(details[0]["loc"]))
        self.details = details


class MergedSectionErrors(RecipeCheckErrors):
    """An override that does not validate once merged: pydantic's error dicts, each `loc` rewritten to
    the recipe key path of the value at fault."""


class Recipe(Strict):
    name: str = Field(pattern=NAME_RE)
    task: Task = DEFAULT_TASK
    data: DataSpec
    teacher: TeacherSpec
    student: Optional[StudentSpec] = None
    distill: Optional[DistillSpec] = None
    prune: list[PruneSpec] = Field(default_factory=list)
    quantize: list[QuantizeSpec] = Field(default_factory=list)
    configs: list[ConfigSpec] = Field(min_length=1)
    baseline: Optional[str] = None  # a config name; defaults to the first config
    benchmark: BenchmarkSpec = BenchmarkSpec()
    gates: GatesSpec = GatesSpec()
    serve_benchmark: Optional[ServeBenchmarkSpec] = None
    overrides: Optional[OverridesSpec] = None  # per device: benchmark/gates/serve_benchmark/baseline
    cache: Optional[CacheSpec] = None  # a shared remote cache (optforge.remote)
    perplexity: Optional[PerplexitySpec] = None  # causal-lm: the perplexity protocol (unset: its defaults)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """The default task and an unset `perplexity` stay out of dumps: a classification recipe hashes as it
        did before causal-lm existed (session.env)."""
        out = without_unset(self, handler(self), "perplexity")
        if out.get("task") == DEFAULT_TASK:
            del out["task"]
        return out

    @property
    def is_lm(self) -> bool:
        return self.task == CAUSAL_LM

    def perplexity_protocol(self) -> "PerplexitySpec":
        """The perplexity settings with their defaults resolved (causal-lm)."""
        spec = self.perplexity or PerplexitySpec()
        context = spec.context_length or self.data.max_length
        return spec.model_copy(update={"context_length": context, "stride": spec.stride or max(1, context // 2)})

    # Cross-references are checked here so every consumer can trust them. Errors carry their key path.
    @model_validator(mode="after")
    def _references(self):
        check_references(self)
        for device in DEVICES:
            self.for_device(device)  # merges and checks each device's view
        return self

    def with_train_precision(self, precision: str) -> Recipe:
        """This recipe with every training spec whose `precision` is unset (teacher `finetune`, `distill`,
        each prune's `recover`) set to `precision`: the device's default, resolved before the graph is
        keyed (`device.default_train_precision`), so the precision a model was trained in is in its key."""
        def fill(spec):
            if isinstance(spec, TrainSpec) and spec.precision is None:
                return spec.model_copy(update={"precision": precision})
            return spec

        teacher = {"finetune": fill(self.teacher.finetune)}
        if self.teacher.finetune == "auto" and self.teacher.auto_precision is None:
            teacher["auto_precision"] = precision
        update: dict = {"teacher": self.teacher.model_copy(update=teacher),
                        "prune": [p.model_copy(update={"recover": fill(p.recover)}) for p in self.prune]}
        if self.distill is not None:
            update["distill"] = fill(self.distill)
        return self.model_copy(update=update)

    def for_device(self, device: str) -> Recipe:
        """The recipe as a build on `device` sees it: only the rows that run there (their `devices`
        cleared), that device's overrides merged in, no `overrides`. Unchanged for a recipe that uses
        neither, so its graph and stage keys are the same on every device."""
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        rows = [c.model_copy(update={"devices": None}) for c in self.configs if c.runs_on(device)]
        if not rows:
            raise RecipeError(f"no configuration runs on {device}: every row's `devices` leaves it out",
                              ("configs",))
        view: dict = {"configs": rows, "overrides": None}
        over = self.overrides_for(device)
        if over is not None:
            for section, model in (("benchmark", BenchmarkSpec), ("gates", GatesSpec),
                                   ("serve_benchmark", ServeBenchmarkSpec)):
                partial = getattr(over, section)
                if partial is False:
                    view[section] = None
                elif partial is not None:
                    view[section] = _merge(model, getattr(self, section), partial, (section,),
                                           ("overrides", device, section))
            if over.baseline is not None:
                view["baseline"] = over.baseline
        recipe = self.model_copy(update=view)
        check_device_references(self, recipe, device)
        return recipe

    def overrides_for(self, device: str) -> Optional[DeviceOverrides]:
        return getattr(self.overrides, device) if self.overrides is not None else None

    @property
    def baseline_config(self) -> str:
        return self.baseline or self.configs[0].name

    def model_names(self) -> list[str]:
        names = ["teacher"]
        if self.student is not None:
            names.append("student")
        names += [p.name for p in self.prune]
        return names


RESERVED_MODEL_NAMES = ("teacher", "student")


def _duplicates(items, what: str, section: str) -> list[tuple[tuple, str]]:
    seen: dict[str, int] = {}
    out = []
    for i, item in enumerate(items):
        if item.name in seen:
            out.append(((section, i, "name"),
                        f"duplicate {what} name {item.name!r} (first used at {section}[{seen[item.name]}])"))
        else:
            seen[item.name] = i
    return out


def _prune_cycles(r: Recipe, models: list[str]) -> list[tuple[tuple, str]]:
    """A prune of a prune of ... must bottom out in teacher/student: name each cycle once, at its first
    entry (an entry that only leads into a cycle is not at fault)."""
    prune_model = {p.name: p.model for p in r.prune}
    named: set[frozenset] = set()
    out = []
    for i, p in enumerate(r.prune):
        if p.model not in models:
            continue  # an unknown model, said on its own
        chain, cur = [p.name], p.model
        while cur in prune_model and cur not in chain:
            chain.append(cur)
            cur = prune_model[cur]
        if cur == p.name and frozenset(chain) not in named:
            named.add(frozenset(chain))
            out.append((("prune", i, "model"), f"prune entries form a cycle: {' -> '.join(chain + [cur])}"))
    return out


def _reference_problems(r: Recipe) -> list[tuple[tuple, str]]:
    """(key path, message) for every name the recipe refers to that is missing, duplicated or reserved."""
    out = _task_problems(r)
    out += _duplicates(r.prune, "prune", "prune") + _duplicates(r.quantize, "quantize", "quantize")
    out += _duplicates(r.configs, "config", "configs")
    if r.distill is not None and r.student is None:
        out.append((("distill",), "`distill` needs a `student` section to distill into"))
    for i, p in enumerate(r.prune):
        if p.name in RESERVED_MODEL_NAMES:
            out.append((("prune", i, "name"), f"prune name {p.name!r} is reserved; pick another"))
    models = r.model_names()
    for i, p in enumerate(r.prune):
        if p.model not in models:
            out.append((("prune", i, "model"), _unknown("model", p.model, models)))
    out += _prune_cycles(r, models)
    qnames = [q.name for q in r.quantize]
    for i, c in enumerate(r.configs):
        if c.model not in models:
            out.append((("configs", i, "model"), _unknown("model", c.model, models)))
        if c.quantize is not None and c.quantize not in qnames:
            out.append((("configs", i, "quantize"), _unknown("quantize entry", c.quantize, qnames)))
        if c.runtime == "onnxruntime" and not r.is_lm:
            out += _onnxruntime_problems(r, i, c)
    cnames = [c.name for c in r.configs]
    if r.baseline is not None and r.baseline not in cnames:
        out.append((("baseline",), _unknown("config", r.baseline, cnames)))
    sb = r.serve_benchmark
    if sb is not None and sb.config != "best" and sb.config not in cnames:
        out.append((("serve_benchmark", "config"), _unknown("config", sb.config, cnames + ["best"])))
    return out


def _task_problems(r: Recipe) -> list[tuple[tuple, str]]:
    """What one task's recipe cannot say: classification settings in a causal-lm recipe and the other way
    round, and what optforge does not do for causal LMs (ONNX Runtime rows, serving). Structured pruning of
    a causal LM needs a GPT-2: recipe_io.check_architectures, from the teacher's config."""
    out: list[tuple[tuple, str]] = []
    if not r.is_lm:
        lm_only = [(("perplexity",), r.perplexity is not None),
                   (("data", "eval_fraction"), r.data.eval_fraction is not None),
                   (("benchmark", "prompt_lengths"), r.benchmark.prompt_lengths is not None),
                   (("benchmark", "new_tokens"), r.benchmark.new_tokens is not None),
                   (("gates", "max_perplexity_increase"), r.gates.max_perplexity_increase is not None)]
        for path, given in lm_only:
            if given:
                out.append((path, f"`{path[-1]}` is for `task: causal-lm` recipes; this one is a classifier "
                                  f"(task: {r.task}); remove it, or set task: causal-lm"))
        return out
    lm = "a causal-lm recipe"
    if "label" in r.data.model_fields_set:
        out.append((("data", "label"), f"{lm} has no labels: its data is plain text (`data.text`); remove `label`"))
    if r.data.eval_fraction is not None and "eval" in r.data.model_fields_set:
        out.append((("data", "eval_fraction"), "give either `eval` (a file) or `eval_fraction` (a share of "
                                               "`train`), not both"))
    for key in ("pooling", "label_map"):
        if getattr(r.teacher, key) is not None:
            out.append((("teacher", key), f"`{key}` belongs to a classifier's head; {lm} keeps the model's "
                                          f"language-modeling head; remove it"))
    if r.teacher.trust_remote_code:
        out.append((("teacher", "trust_remote_code"), f"{lm} loads only architectures transformers ships "
                                                      f"(AutoModelForCausalLM without remote code); remove it"))
    if "max_accuracy_drop" in r.gates.model_fields_set:
        out.append((("gates", "max_accuracy_drop"), f"{lm} is gated on perplexity: use "
                                                    f"`max_perplexity_increase` (in %) instead"))
    if r.serve_benchmark is not None:
        out.append((("serve_benchmark",), f"`optforge serve` serves classifiers only; {lm} has no serving "
                                          f"benchmark (serve causal LMs with a generation server: README)"))
    for i, c in enumerate(r.configs):
        if c.runtime != DEFAULT_RUNTIME:
            out.append((("configs", i, "runtime"), f"{lm} runs in PyTorch only; use runtime: torch"))
    proto = r.perplexity_protocol()
    if proto.stride >= proto.context_length:
        out.append((("perplexity", "stride"), f"stride {proto.stride} must be below the context length "
                                              f"{proto.context_length} (perplexity.context_length, else data.max_length)"))
    for path, spec in _train_specs(r):
        if spec.devices > 1:
            out.append((path + ("devices",), f"{lm} trains on one device (optforge.lm.train); data-parallel "
                                              f"`devices` is for classification recipes; remove it"))
        if spec.embedding_grad is not None:
            out.append((path + ("embedding_grad",), f"{lm} trains its embeddings with dense AdamW "
                                                     f"(optforge.lm.train); `embedding_grad` is for classification "
                                                     f"recipes; remove it"))
        for option in ("layer_lr_decay", "average_last"):
            if getattr(spec, option) is not None:
                out.append((path + (option,), f"{lm} trains with its own loop (optforge.lm.train), which has no "
                                              f"`{option}`; it is for classification recipes; remove it"))
    ft = r.teacher.finetune
    if r.teacher.config is not None and isinstance(ft, TrainSpec) and ft.freeze_embeddings:
        out.append((("teacher", "finetune", "freeze_embeddings"),
                    "a random-init causal LM must train its token embeddings (tied to its LM head); set "
                    "freeze_embeddings: false"))
    return out


def _train_specs(r: Recipe) -> list[tuple[tuple, TrainSpec]]:
    """(key path, spec) of every training spec the recipe writes: teacher finetune, distill, prune recovers."""
    specs = [(("teacher", "finetune"), r.teacher.finetune), (("distill",), r.distill)]
    specs += [(("prune", i, "recover"), p.recover) for i, p in enumerate(r.prune)]
    return [(path, spec) for path, spec in specs if isinstance(spec, TrainSpec)]


def _onnxruntime_problems(r: Recipe, i: int, c: ConfigSpec) -> list[tuple[tuple, str]]:
    """What a `runtime: onnxruntime` row cannot have: a PyTorch compile, a precision other than fp32, a
    quantize entry whose method has no ONNX Runtime counterpart (methods.quantize: `onnxruntime`)."""
    out = []
    if c.compile != compile_methods.NONE:
        out.append((("configs", i, "compile"),
                    f"compile: {c.compile} does not apply to a `runtime: onnxruntime` row: ONNX Runtime optimizes "
                    f"the exported graph itself; use compile: none, or runtime: torch to compile with PyTorch"))
    if c.precision != "fp32":
        out.append((("configs", i, "precision"),
                    f"runtime: onnxruntime computes in fp32 (int8 through a quantize entry); got {c.precision} "
                    f"(use fp32, or runtime: torch for {c.precision})"))
    step = next((q for q in r.quantize if q.name == c.quantize), None)
    if step is not None and quant_methods.get_method(step.method).onnxruntime is None:
        out.append((("configs", i, "quantize"),
                    f"quantize entry {c.quantize!r} uses {step.method}, which has no ONNX Runtime counterpart; "
                    f"with runtime: onnxruntime use an entry whose method is one of: "
                    f"{', '.join(quant_methods.onnxruntime_methods())} (ONNX Runtime dynamic int8)"))
    return out


def check_references(r: Recipe) -> None:
    """Raises RecipeCheckErrors with every bad reference at once (like schema errors), not the first."""
    problems = _reference_problems(r)
    if problems:
        raise RecipeCheckErrors([{"type": "value_error", "loc": path, "msg": msg} for path, msg in problems])


def _merge(model: type[BaseModel], base: Optional[BaseModel], partial: dict, base_path: tuple,
           override_path: tuple) -> BaseModel:
    """`partial` merged key by key over `base` (or `model`'s defaults), validated as `model`. An error is
    blamed on the override's key when the override wrote that key (or the error is about the whole
    section), else on the base section's."""
    try:
        return model.model_validate((base.model_dump() if base is not None else {}) | partial)
    except ValidationError as e:
        details = []
        for err in e.errors():
            loc = tuple(err["loc"])
            prefix = override_path if not loc or loc[0] in partial else base_path
            details.append(err | {"loc": prefix + loc})
        raise MergedSectionErrors(details) from None


def check_device_references(recipe: Recipe, view: Recipe, device: str) -> None:
    """What must hold on each device: the baseline and a named serving config are rows there."""
    over = recipe.overrides_for(device) or DeviceOverrides()
    rows = [c.name for c in view.configs]
    if view.baseline is not None and view.baseline not in rows:
        path = ("overrides", device, "baseline") if over.baseline is not None else ("baseline",)
        raise RecipeError(_not_on_device(recipe, view.baseline, device, rows, f"overrides.{device}.baseline"),
                          path)
    sb = view.serve_benchmark
    if sb is not None and sb.config != "best" and sb.config not in rows:
        path = ("serve_benchmark", "config")
        if isinstance(over.serve_benchmark, dict) and "config" in over.serve_benchmark:
            path = ("overrides", device) + path
        raise RecipeError(_not_on_device(recipe, sb.config, device, rows + ["best"],
                                         f"overrides.{device}.serve_benchmark.config"), path)


def _not_on_device(recipe: Recipe, name: str, device: str, known: list[str], fix: str) -> str:
    index = {c.name: i for i, c in enumerate(recipe.configs)}
    if name not in index:
        return _unknown("config", name, known)
    return (f"config {name!r} does not run on {device} (configs[{index[name]}].devices: "
            f"{', '.join(recipe.configs[index[name]].devices)}); name one that does with {fix} "
            f"(on {device}: {', '.join(known)})")


def _unknown(what: str, value: str, known: list[str]) -> str:
    import difflib

    msg = f"unknown {what} {shown(value)}"
    close = difflib.get_close_matches(value, known, n=1)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    if known:
        msg += f" (known: {', '.join(known)})"
    else:
        msg += " (none are defined)"
    return msg


def model_stage_name(recipe: Recipe, model: str) -> str:
    """The stage that produces the named model."""
    if model == "teacher":
        return "teacher"
    if model == "student":
        return "distill" if recipe.distill is not None else "student"
    return f"prune:{model}"



# --------------------------------------------------------------------------- per-stage parameter models
# Stages whose parameters are not a recipe section verbatim. `optforge.graph` fills them from the recipe.


PruneParams = PruneFields


class QuantizeParams(Strict):
    """The quantize stage's parameters: the method, the row's precision, and the method's parameters
    (validated by the method), plus QUANTIZE_KEY_DEFAULTS for the methods that do not declare them."""

    method: QuantMethod
    group_size: int = QUANTIZE_KEY_DEFAULTS["group_size"]
    precision: Precision = "fp32"

    @model_validator(mode="after")
    def _method_params(self):
        self.method_params()
        return self

    def method_params(self) -> BaseModel:
        method = quant_methods.get_method(self.method)
        return method.params.model_validate({f: getattr(self, f) for f in method.params.model_fields})

    @classmethod
    def for_step(cls, spec, precision: str) -> dict:
        """The stage parameters (JSON) of quantize entry `spec` in a row computing in `precision`."""
        step = {k: v for k, v in spec.model_dump(mode="json", context=KEY_COMPAT).items() if k != "name"}
        return cls.model_validate(step | {"precision": precision}).model_dump(mode="json")


class OnnxRuntimeParams(Strict):
    """The onnxruntime stage's parameters: what the exported graph computes in. `quantization` is the ONNX
    Runtime quantization the row's quantize entry maps to (methods.quantize: `onnxruntime`), so entries of
    different methods that mean the same ONNX Runtime quantization share one stage key."""

    precision: Literal["fp32"] = "fp32"
    quantization: Optional[Literal[quant_methods.ORT_QUANTIZATIONS]] = None

    @classmethod
    def for_row(cls, recipe: "Recipe", c: ConfigSpec) -> dict:
        step = next((q for q in recipe.quantize if q.name == c.quantize), None)
        quantization = quant_methods.get_method(step.method).onnxruntime if step is not None else None
        return cls.model_validate({"precision": c.precision, "quantization": quantization}).model_dump(mode="json")


class CompileParams(Strict):
    mode: CompileMode
    precision: Precision = "fp32"
    max_length: int = 64  # longest sequence the compiled artifact must accept
    max_batch: int = 32  # largest batch it must accept

    @classmethod
    def for_row(cls, recipe: "Recipe", c: ConfigSpec) -> dict:
        """A row's compile: the data's max length, and batches up to the largest benchmarked (at least 64)."""
        return {"mode": c.compile, "precision": c.precision, "max_length": recipe.data.max_length,
                "max_batch": max(max(recipe.benchmark.batch_sizes), 64)}


class TeacherLogitsParams(Strict):
    """The teacher_logits stage: the teacher's logits over the train split, computed once for `distill`
    and every prune `recover` (soft targets), under `precision` autocast (the distillation's training
    precision), in length-sorted batches of `batch_size`."""

    precision: Literal["fp32", "bf16"] = "fp32"
    batch_size: int = Field(128, ge=1)


class EvaluateParams(Strict):
    precision: Precision = "fp32"
    batch_size: int = Field(64, ge=1)


class BenchmarkParams(BenchmarkSpec):
    precision: Precision = "fp32"
    # The configuration the row is compared with in the same run (its final artifact is the stage's
    # `baseline` input) and that configuration's precision; None for the baseline row itself.
    baseline_config: Optional[str] = None
    baseline_precision: Optional[Precision] = None


class ServeBenchmarkParams(ServeBenchmarkSpec):
    baseline: str
    gates: GatesSpec


# --------------------------------------------------------------------------- causal-lm stage parameters


class LMCompileParams(Strict):
    """lm_compile: the compile mode (as it resolves on the build's device) and the row's precision."""

    mode: CompileMode
    precision: Precision = "fp32"

    @classmethod
    def for_row(cls, recipe: "Recipe", c: ConfigSpec) -> dict:
        return {"mode": c.compile, "precision": c.precision}


class LMEvaluateParams(Strict):
    """lm_evaluate: the row's precision and the perplexity protocol (optforge.lm.perplexity)."""

    precision: Precision = "fp32"
    context_length: int = Field(ge=8)
    stride: int = Field(ge=1)
    batch_size: int = Field(8, ge=1)

    @classmethod
    def for_row(cls, recipe: "Recipe", c: ConfigSpec) -> dict:
        p = recipe.perplexity_protocol()
        return {"precision": c.precision, "context_length": p.context_length, "stride": p.stride,
                "batch_size": p.batch_size}


class LMBenchmarkParams(BenchmarkSpec):
    """lm_benchmark: the benchmark section with the causal-lm defaults filled in, plus the row's precision
    and the baseline it is compared with (as BenchmarkParams)."""

    precision: Precision = "fp32"
    baseline_config: Optional[str] = None
    baseline_precision: Optional[Precision] = None

    @classmethod
    def for_row(cls, recipe: "Recipe", c: ConfigSpec) -> dict:
        b = recipe.benchmark
        return b.model_dump(mode="json") | {
            "prompt_lengths": b.prompt_lengths or LM_PROMPT_LENGTHS, "new_tokens": b.new_tokens or LM_NEW_TOKENS,
            "precision": c.precision}
