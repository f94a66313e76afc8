"""Causal LMs as optforge keeps them: loading (AutoModelForCausalLM; no remote code), a random-init GPT-2,
students made of teacher layers, GPT-2's Conv1D -> nn.Linear, and the float artifact.

A float LM artifact is a stock transformers directory plus optforge's files:
  model.safetensors, config.json, generation_config.json   `save_pretrained` (safetensors, never pickled)
  tokenizer/                                                the HF tokenizer files
  optforge_model.json   {"format": "lm-float", "task": "causal-lm", "precision": "fp32", "max_length", "source"}
so `AutoModelForCausalLM.from_pretrained(<dir>)` reads it as is — except a GPT-2 whose attention heads were
pruned (or whose blocks' FFN widths differ), which no stock config describes: its optforge_model.json adds
"pruned_layers" (per block {"heads", "head_size", "intermediate"}; optforge.lm.structure), and optforge's
loaders build the model from config.json, give each block those shapes, then load model.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from optforge.errors import OptforgeError, RecipeError

META = "optforge_model.json"
TOKENIZER_DIR = "tokenizer"
FLOAT_FORMAT = "lm-float"
TASK = "causal-lm"
VOCAB_MULTIPLE = 64  # a random-init model's vocabulary is padded to this (int4 packing wants N % 16 == 0)


def load_pretrained(ref: str):
    """A pretrained causal LM in fp32 from pkg:/hf:/a folder, through AutoModelForCausalLM (no remote code:
    only architectures transformers ships)."""
    from transformers import AutoModelForCausalLM

    from optforge.modeling import _from_pretrained

    return _from_pretrained(AutoModelForCausalLM.from_pretrained, ref, "causal LM", dtype=torch.float32)


def check_causal_config(ref: str) -> None:
    """RecipeError at `teacher.model` when the checkpoint's config names no causal-LM architecture
    (a BERT encoder given to a causal-lm recipe)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from optforge.modeling import _from_pretrained

    config = _from_pretrained(AutoConfig.from_pretrained, ref, "model config")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise RecipeError(f"{ref!r} is a {config.model_type} model, which transformers has no causal-LM head for "
                          f"(AutoModelForCausalLM); a causal-lm recipe needs a decoder such as gpt2 or llama",
                          ("teacher", "model"))


def padded_vocab(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def random_gpt2(spec, vocab_size: int, n_positions: int, bos_eos: Optional[int] = None):
    """A GPT-2 with random weights from a RandomInitSpec (layers, hidden, heads, FFN width); the same seed
    gives the same weights. The vocabulary is padded to a multiple of VOCAB_MULTIPLE."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=padded_vocab(vocab_size), n_positions=n_positions, n_embd=spec.hidden_size,
                        n_layer=spec.num_layers, n_head=spec.num_heads, n_inner=spec.intermediate_size,
                        bos_token_id=bos_eos, eos_token_id=bos_eos, tie_word_embeddings=True)  # no padding: unpadded blocks
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return GPT2LMHeadModel(config)


# --------------------------------------------------------------------------- architecture access


# model_type -> (path of the ModuleList of transformer blocks). Student-from-layers needs it; everything
# else (training, quantization, decoding) goes through the model's own forward.
LAYER_LISTS = {"gpt2": "transformer.h", "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
               "gpt_neox": "gpt_neox.layers", "opt": "model.decoder.layers"}


def layer_list(model) -> nn.ModuleList:
    path = LAYER_LISTS.get(model.config.model_type)
    if path is None:
        raise OptforgeError(f"a student made of teacher layers is not implemented for {model.config.model_type} "
                            f"(known: {', '.join(sorted(LAYER_LISTS))})")
    return model.get_submodule(path)


def select_layers(model, indices: list[int]):
    """The model with only the transformer blocks at `indices` (in order), renumbered for the KV cache; the
    embeddings, final norm and LM head are kept. In place; returns the model."""
    layers = layer_list(model)
    if max(indices) >= len(layers):
        raise RecipeError(f"layers {[i for i in indices if i >= len(layers)]} are not in the teacher: it has "
                          f"{len(layers)} layers, numbered 0..{len(layers) - 1}", ("student", "from_teacher", "layers"))
    kept = [layers[i] for i in indices]
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    layers_parent, _, attr = LAYER_LISTS[model.config.model_type].rpartition(".")
    setattr(model.get_submodule(layers_parent), attr, nn.ModuleList(kept))
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in indices]
    return model


def conv1d_to_linear(model) -> int:
    """Replace every transformers `Conv1D` (GPT-2's projections: y = x @ W + b with W [in, out]) with the
    equivalent nn.Linear (W transposed), in place; returns how many. torchao's default filter and PyTorch's
    dynamic quantization match nn.Linear only, so without this a GPT-2 "quantized" model would be unchanged."""
    from transformers.pytorch_utils import Conv1D

    n = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        w = module.weight
        linear = nn.Linear(w.shape[0], w.shape[1], bias=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w.t())
            linear.bias.copy_(module.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, linear)
        n += 1
    return n


def count_conv1d(model) -> int:
    from transformers.pytorch_utils import Conv1D

    return sum(1 for m in model.modules() if isinstance(m, Conv1D))


# --------------------------------------------------------------------------- the float artifact


def read_meta(artifact_dir) -> dict:
    path = Path(artifact_dir) / META
    if not path.is_file():
        raise OptforgeError(f"{artifact_dir} is not an optforge model artifact (no {META})")
    return json.loads(path.read_text())


def save_float(model, tokenizer, meta: dict, out_dir) -> dict:
    """Write the float artifact (module docstring); returns its optforge_model.json."""
    from optforge.lm.structure import undescribed_shapes
    from optforge.modeling import _quiet_transformers

    out = Path(out_dir)
    shapes = undescribed_shapes(model)  # sets config.n_inner when every block keeps one FFN width
    meta = {k: v for k, v in meta.items() if k != "pruned_layers"} | ({"pruned_layers": shapes} if shapes else {})
    with _quiet_transformers():  # no "Writing model shards" bar in a build log
        model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    full = {"format": FLOAT_FORMAT, "task": TASK, "precision": "fp32"} | meta
    (out / META).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def load_float(artifact_dir):
    """(model in fp32, eval mode, on CPU; tokenizer; meta) of a float LM artifact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optforge.modeling import _quiet_transformers

    d = Path(artifact_dir)
    meta = read_meta(d)
    if FLOAT_FORMAT not in (meta.get("format"), meta.get("base_format")):  # a compiled float artifact has its files
        raise OptforgeError(f"{d}: expected a float causal-LM artifact, got format {meta.get('format')!r}")
    with _quiet_transformers():
        if "pruned_layers" in meta:
            model = _load_pruned(d, meta)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(d / TOKENIZER_DIR))
    return model.eval(), tokenizer, meta


def _load_pruned(d: Path, meta: dict):
    """A structurally pruned GPT-2: the skeleton at the saved shapes, model.safetensors loaded over it (every
    tensor; the LM head, tied to the embeddings, is the one save_pretrained leaves out)."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    model = skeleton(d, meta)
    state = load_file(str(d / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = model.state_dict()
    loaded = {params[k].data_ptr() for k in state}
    untied = [k for k in missing if params[k].data_ptr() not in loaded]
    if unexpected or untied:
        raise OptforgeError(f"{d}: model.safetensors does not match the pruned shapes in {META} "
                            f"(missing {untied}, unexpected {unexpected})")
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(d))
    return model


def skeleton(artifact_dir, meta: Optional[dict] = None):
    """The artifact's model with random weights, fp32, at its saved shapes (weights are loaded over it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from optforge.lm.structure import fit_blocks
    from optforge.modeling import _quiet_transformers

    meta = read_meta(artifact_dir) if meta is None else meta
    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(artifact_dir))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if "pruned_layers" in meta:
        fit_blocks(model, meta["pruned_layers"])
    return model


def copy_side_files(src: Path, out: Path) -> None:
    """config.json, generation_config.json and tokenizer/ of a float artifact, so `out` is self-contained."""
    import shutil

    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    shutil.copytree(src / TOKENIZER_DIR, out / TOKENIZER_DIR)


def eos_id(tokenizer) -> int:
    """The id that separates documents in a token stream: EOS, else SEP (BERT-style tokenizers), else 0."""
    for attr in ("eos_token_id", "sep_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
