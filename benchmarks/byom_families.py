"""Bring your own model, end to end: a tiny random classifier checkpoint
(`AutoModelForSequenceClassification.from_config` + `save_pretrained`) is the teacher, used as is, and
goes through every stage of a tiny recipe as a user's build would, in a subprocess: student from layers, distillation, structured and
unstructured pruning, quantization, evaluation, benchmark, report, and export: the stock-head student as a
transformers directory, the pruned student as ONNX (a head-pruned model has no stock config: hf refuses it
and names the formats that take it). Compile per family is in tests/stages/test_families.py (AOTInductor
takes a minute a model here), pt2 export in tests/test_export.py.

Run it with `OPTFORGE_DATA_ROOT=../shared/data python -m pytest benchmarks/byom_families.py` (about a
minute a family on 2 cores): out of CI for time; in CI each family, under both heads, goes through the same
stages one by one (tests/stages/test_families.py) and hf export (tests/test_export.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "stages")]
from tiny_models import FAMILIES, save_tiny_checkpoint  # noqa: E402
from optforge_testing import run_cli as optforge, shared_data_root  # noqa: E402

pytestmark = pytest.mark.skipif(not (shared_data_root() / "sst2" / "train.tsv").is_file(), reason="no SST-2 data")

RECIPE = """\
name: {family}
data: {{dataset: sst2, max_train_samples: 128, max_eval_samples: 64, max_length: 32}}
teacher: {{model: {ckpt}}}
student: {{from_teacher: {{layers: [0, 2]}}}}
distill: {{epochs: 0.5, batch_size: 16, lr: 1.0e-3, freeze_embeddings: false}}
prune:
  - {{name: pruned, model: student, method: structured, heads: 0.5, ffn: 0.5,
     recover: {{epochs: 0.25, batch_size: 16, lr: 1.0e-3}}}}
  - {{name: sparse, model: student, method: unstructured, amount: 0.5}}
quantize:
  - {{name: dyn8, method: torch-int8-dynamic}}
  - {{name: ao8, method: int8-weight-only}}
configs:
  - {{name: baseline, model: teacher}}
  - {{name: student, model: student}}
  - {{name: pruned, model: pruned}}
  - {{name: sparse, model: sparse}}
  - {{name: pruned-dyn8, model: pruned, quantize: dyn8}}
  - {{name: student-ao8, model: student, quantize: ao8}}
benchmark: {{batch_sizes: [1, 4], warmup: 1, min_runs: 3, max_seconds: 0.2}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_runs_on_a_classifier_checkpoint(family, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", family)
    recipe = tmp_path / f"{family}.yaml"
    recipe.write_text(RECIPE.format(family=family, ckpt=ckpt))
    result = optforge("build", recipe, "--device", "cpu", cwd=tmp_path, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "reports" / family / "results.json").read_text())
    rows = {r["name"]: r for r in results["configs"]}
    assert set(rows) == {"baseline", "student", "pruned", "sparse", "pruned-dyn8", "student-ao8"}
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["reason"])
        assert 0 <= row["accuracy"] <= 1 and row["eval_n"] == 64, name
    # the pruned student is really smaller than the student it came from
    assert rows["pruned"]["params"] < rows["student"]["params"] < rows["baseline"]["params"]

    def export(config, fmt):
        return optforge("export", recipe, "--config", config, "--format", fmt, "--out",
                        tmp_path / "exports" / f"{config}-{fmt}", "--device", "cpu", cwd=tmp_path,
                        cache=tmp_path / "cache")

    for config, fmt in [("student", "hf"), ("pruned", "onnx")]:
        done = export(config, fmt)
        assert done.returncode == 0, (config, fmt, done.stdout[-2000:], done.stderr[-2000:])
        assert (tmp_path / "exports" / f"{config}-{fmt}" / "MANIFEST").is_file()
    refused = export("pruned", "hf")
    assert refused.returncode != 0 and "not exportable as hf" in refused.stderr and "onnx" in refused.stderr
    assert "Traceback" not in refused.stderr
