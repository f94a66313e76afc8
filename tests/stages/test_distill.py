"""distillation loss and the distill stage."""

from __future__ import annotations

import math

import pytest
import torch

from optforge.modeling import load_classifier
from optforge.stages.data import Splits
from optforge.tokens import tokenize
from optforge.training import distillation_loss, predict_logits


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_loss_equals_the_formula_by_hand():
    s = [[1.0, -0.5, 2.0], [0.0, 0.3, -1.2]]
    t = [[2.0, 0.0, 1.0], [-1.0, 1.5, 0.5]]
    y = [2, 0]
    T, alpha = 3.0, 0.7
    kl = ce = 0.0
    for si, ti, yi in zip(s, t, y):
        p_t = _softmax([v / T for v in ti])
        p_s = _softmax([v / T for v in si])
        kl += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))  # KL(teacher || student)
        ce += -math.log(_softmax(si)[yi])
    expected = alpha * (kl / 2) * T * T + (1 - alpha) * (ce / 2)
    got = distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the ends: alpha=0 is plain cross-entropy, alpha=1 with identical logits is zero
    assert distillation_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, 0.0).item() == \
        pytest.approx(ce / 2, rel=1e-6)
    assert distillation_loss(torch.tensor(s), torch.tensor(s), torch.tensor(y), T, 1.0).item() == \
        pytest.approx(0.0, abs=1e-7)


def _kl_to_teacher(student, teacher, ids, T):
    s = predict_logits(student, ids, 0, "cpu")
    t = predict_logits(teacher, ids, 0, "cpu")
    return torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.softmax(t / T, -1),
                                      reduction="batchmean").item()


def test_distill_moves_the_student_towards_the_teacher(tiny_teacher, toy_data, run_stage, tmp_path):
    teacher_dir, t_metrics = tiny_teacher
    data_dir, data_metrics = toy_data
    run_stage("student", {"config": {"num_layers": 1, "hidden_size": 32, "num_heads": 2,
                                     "intermediate_size": 64, "seed": 1}}, tmp_path / "student",
              {"teacher": teacher_dir})
    params = {"epochs": 4, "batch_size": 16, "lr": 3e-3, "temperature": 2.0, "alpha": 0.9,
              "freeze_embeddings": False, "warmup": 0.1, "precision": "fp32"}
    run_stage("teacher_logits", {"precision": "fp32"}, tmp_path / "logits", {"teacher": teacher_dir, "data": data_dir},
              {"data": data_metrics})
    m = run_stage("distill", params, tmp_path / "distill",
                  {"student": tmp_path / "student", "logits": tmp_path / "logits", "data": data_dir},
                  {"data": data_metrics})
    assert m["steps"] == 4 * 16 and m["final_loss"] < 0.5 * m["first_loss"]
    assert m["accuracy"] >= 0.9 and m["n"] == 64

    teacher, tok, _ = load_classifier(teacher_dir)
    before, _, _ = load_classifier(tmp_path / "student")
    after, _, meta = load_classifier(tmp_path / "distill")
    ids = tokenize(tok, Splits(data_dir).eval_texts, 32)
    assert _kl_to_teacher(after, teacher, ids, 2.0) < 0.25 * _kl_to_teacher(before, teacher, ids, 2.0)
    assert meta["format"] == "float" and meta["max_length"] == 32
    assert len(after.encoder.encoder.layer) == 1


def test_the_teacher_runs_once_in_its_own_stage_and_never_in_distill(tiny_teacher, toy_data, run_stage, tmp_path,
                                                                      monkeypatch):
    """Teacher logits are computed in one pass over the train set by the teacher_logits stage (which
    distill and every prune recovery read), never per step."""
    from optforge.modeling import TextClassifier

    data_dir, data_metrics = toy_data
    run_stage("student", {"from_teacher": {"layers": [0]}}, tmp_path / "student", {"teacher": tiny_teacher[0]})
    calls = {"teacher": 0, "student": 0}
    original = TextClassifier.forward

    def counting(self, input_ids, attention_mask):
        calls["teacher" if len(self.encoder.encoder.layer) == 3 else "student"] += 1
        return original(self, input_ids, attention_mask)

    monkeypatch.setattr(TextClassifier, "forward", counting)
    lm = run_stage("teacher_logits", {"precision": "fp32"}, tmp_path / "logits",
                   {"teacher": tiny_teacher[0], "data": data_dir}, {"data": data_metrics})
    assert calls == {"teacher": math.ceil(256 / 128), "student": 0}  # one inference pass in batches of 128
    assert lm["examples"] == 256 and lm["num_labels"] == 2 and lm["autocast"] == "fp32"
    m = run_stage("distill", {"epochs": 2, "batch_size": 32}, tmp_path / "distill",
                  {"student": tmp_path / "student", "logits": tmp_path / "logits", "data": data_dir},
                  {"data": data_metrics})
    assert calls["teacher"] == math.ceil(256 / 128)  # distill ran no teacher forward
    assert calls["student"] == m["steps"] + math.ceil(64 / 64)  # training steps + one eval pass


def test_bf16_teacher_logits_agree_with_fp32(tiny_teacher, toy_data, run_stage, tmp_path):
    """The logits pass under bf16 autocast (the default on a CPU with AVX512_BF16/AMX) gives the soft targets
    of the fp32 pass within bf16 rounding: the same argmax, and the same softened distribution to 0.02."""
    from optforge.stages import teacher_logits

    data_dir, data_metrics = toy_data
    out = {}
    for precision in ("fp32", "bf16"):
        run_stage("teacher_logits", {"precision": precision}, tmp_path / precision,
                  {"teacher": tiny_teacher[0], "data": data_dir}, {"data": data_metrics})
        out[precision] = teacher_logits.load(tmp_path / precision, 256)
    assert out["bf16"].dtype == torch.float32 and out["bf16"].shape == (256, 2)
    assert not torch.equal(out["bf16"], out["fp32"])  # the bf16 pass really ran in bf16
    p32, p16 = torch.softmax(out["fp32"] / 2, -1), torch.softmax(out["bf16"] / 2, -1)
    assert (p32 - p16).abs().max() < 0.02
    confident = (p32.max(-1).values > 0.55)
    assert torch.equal(out["fp32"].argmax(-1)[confident], out["bf16"].argmax(-1)[confident])
    with pytest.raises(ValueError, match="do not match the 255 train examples"):
        teacher_logits.load(tmp_path / "fp32", 255)


def test_distill_reports_each_of_its_loops(tiny_teacher, toy_data, run_stage, tmp_path):
    """Off a terminal, with a line at every update (interval 0) and a clock that stands still (so no rate
    and no ETA): the teacher's logits pass, the training steps with the loss and examples/s, evaluation."""
    import io
    import re

    from optforge.progress import stage_progress

    data_dir, data_metrics = toy_data
    run_stage("student", {"from_teacher": {"layers": [0]}}, tmp_path / "student", {"teacher": tiny_teacher[0]})
    out = io.StringIO()
    run_stage("teacher_logits", {"precision": "fp32"}, tmp_path / "logits", {"teacher": tiny_teacher[0], "data": data_dir},
              {"data": data_metrics},
              progress=stage_progress("teacher_logits", file=out, interval=0, clock=lambda: 0.0))
    assert out.getvalue().splitlines() == [
        "  [teacher_logits] teacher logits: example 128/256 (50%), elapsed 0.0s",
        "  [teacher_logits] teacher logits: example 256/256 (100%), elapsed 0.0s",
        "  [teacher_logits] teacher logits: done: 256 examples in 0.0s"]
    out = io.StringIO()
    m = run_stage("distill", {"epochs": 1, "batch_size": 16}, tmp_path / "distill",
                  {"student": tmp_path / "student", "logits": tmp_path / "logits", "data": data_dir},
                  {"data": data_metrics}, progress=stage_progress("distill", file=out, interval=0, clock=lambda: 0.0))
    lines = out.getvalue().splitlines()
    steps = [re.fullmatch(r"  \[distill\] distill: step (\d+)/16 \(\d+%\), [\d.]+ ex/s, loss \d+\.\d{4}, "
                          r"elapsed 0\.0s", line) for line in lines[0:16]]
    assert [int(s[1]) for s in steps] == list(range(1, 17)) == list(range(1, m["steps"] + 1)), lines
    assert re.fullmatch(r"  \[distill\] distill: done: 16 steps in 0\.0s, [\d.]+ ex/s, loss \d+\.\d{4}", lines[16])
    assert lines[17:] == ["  [distill] evaluate: example 64/64 (100%), elapsed 0.0s",
                          "  [distill] evaluate: done: 64 examples in 0.0s"]
