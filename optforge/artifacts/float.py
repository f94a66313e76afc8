"""Float artifacts (format "float"): an encoder + head in safetensors (optforge.modeling), cast to the
precision asked for at load time."""

from __future__ import annotations

from pathlib import Path

from optforge.errors import OptforgeError


def load(artifact_dir: Path, device: str, precision: str = "fp32"):
    from optforge.artifacts.runnable import Runnable
    from optforge.modeling import PRECISION_DTYPES, load_classifier

    if precision not in PRECISION_DTYPES:
        raise OptforgeError(f"unknown precision {precision!r} (known: {', '.join(PRECISION_DTYPES)})")
    model, tokenizer, meta = load_classifier(artifact_dir)
    model = model.to(device=device, dtype=PRECISION_DTYPES[precision]).eval()
    return Runnable(model, tokenizer, meta, device, precision=precision, artifact_dir=artifact_dir,
                    description=f"float {precision}")
